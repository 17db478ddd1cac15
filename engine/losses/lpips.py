"""LPIPS on pixels (Zhang et al. 2018; docs/method.md §7): torchvision's VGG16 trunk from a local file, tapped
at relu1_2 … relu5_3 behind LPIPS's input scaling, with the linear heads the ``lpips`` package ships."""
from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from engine.errors import ConfigError, DataError, MissingFileError
from engine.files import read_tensor_file

# Index after the last ReLU of each LPIPS tap in torchvision's vgg16().features.
LPIPS_VGG16_TAP_ENDS = (4, 9, 16, 23, 30)
LPIPS_VGG16_TAP_CHANNELS = (64, 128, 256, 512, 512)
VGG16_HINT = ("point it at torchvision's ImageNet VGG16 weights (vgg16-397923af.pth: a state dict with "
              "features.N.weight/bias keys, or the features' own N.weight/bias keys; .pth or .safetensors), "
              "downloaded on a machine with network access and copied here")


def load_lpips_vgg16(path: str | Path) -> nn.Sequential:
    """The conv trunk of torchvision's VGG16 up to relu5_3 (no classifier is built), weights from ``path``."""
    from torchvision.models.vgg import cfgs, make_layers

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"VGG16 weights '{path}' do not exist: {VGG16_HINT}")
    try:
        state = read_tensor_file(path)
        if not isinstance(state, dict):
            raise ValueError(f"holds a {type(state).__name__}, not a state dict")
        if any(k.startswith("features.") for k in state):
            state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        trunk = make_layers(cfgs["D"])[:LPIPS_VGG16_TAP_ENDS[-1]]
        trunk.load_state_dict(state)
    except (OSError, RuntimeError, ValueError, SafetensorError, EOFError, TypeError,
            pickle.UnpicklingError) as error:
        # torch.load's unpickling errors are pages long and suggest weights_only=False: name the type only
        reason = "not a torch checkpoint" if isinstance(error, pickle.UnpicklingError) else str(error).splitlines()[0]
        raise DataError(f"'{path}' is not a VGG16 weights file ({reason}): {VGG16_HINT}") from None
    return trunk


def lpips_heads() -> list[torch.Tensor]:
    """The five non-negative per-channel heads of LPIPS(vgg, v0.1), read from the installed lpips package."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        raise ConfigError("loss 'lpips' takes its linear heads from the lpips package: pip install lpips==0.1.4")
    path = Path(spec.origin).parent / "weights" / "v0.1" / "vgg.pth"
    state = torch.load(path, map_location="cpu", weights_only=True)
    return [state[f"lin{k}.model.1.weight"].reshape(-1) for k in range(len(LPIPS_VGG16_TAP_ENDS))]


class LPIPSVGG16(nn.Module):
    """VGG16 features at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of pixels in [-1, 1], after LPIPS's
    ScalingLayer ((x − shift)/scale per RGB channel). One-channel (grey) images are repeated to RGB."""

    SHIFT = (-0.030, -0.088, -0.188)
    SCALE = (0.458, 0.448, 0.450)

    def __init__(self, trunk: nn.Sequential, in_channels: int = 3):
        super().__init__()
        if in_channels not in (1, 3):
            raise ConfigError(f"loss 'lpips' runs VGG16 on RGB (or grey) pixels, the data has {in_channels} channels")
        self.arch = {"in_channels": in_channels}
        bounds = (0,) + LPIPS_VGG16_TAP_ENDS
        self.slices = nn.ModuleList(trunk[a:b] for a, b in zip(bounds[:-1], bounds[1:]))
        self.tap_channels = list(LPIPS_VGG16_TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor(self.SHIFT).reshape(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(self.SCALE).reshape(1, 3, 1, 1))

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x.expand(-1, 3, -1, -1) - self.shift) / self.scale
        out = []
        for s in self.slices:
            x = s(x)
            out.append(x)
        return out


# The digits feature net: everything that changes its weights; the hash names the cache file.
# 5 taps of 8/16/32/64/64 channels at 16x16; ~98% held-out accuracy after ~20 s on one core.
