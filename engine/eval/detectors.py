"""The feature networks of FID and FD_DINOv2, taken from maintained packages, weights read from local files.

**FID: Inception-v3, the 2015-12-05 TensorFlow graph, from torch-fidelity.** pytorch-fid's ``fid_inception_v3`` and
torch-fidelity's ``FeatureExtractorInceptionV3`` are the same network (torchvision's Inception3 with the FID blocks
patched the same way) with the same module names, and their files, pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` and torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (named
with the same sha256 prefix), hold the same state dict layout: either loads as it is (tests/eval/test_detectors.py
loads pytorch-fid's network from this one's weights). They differ in what happens before the network. The TF graph
resizes with TF 1.x ``ResizeBilinear`` (align_corners=False: output pixel i samples input i·in/out, no half-pixel
offset) and scales (x − 128)/128; torch-fidelity does exactly this from uint8 images
(``interpolate_bilinear_2d_like_tensorflow1x``, bit-exact on CPU by its docs). pytorch-fid resizes with
``F.interpolate(bilinear, align_corners=False)`` (half-pixel centres) and scales 2·x/255 − 1, which differ from
the graph at every size but 299 (for 32×32 images the features move visibly; the tests show it). EDM scores with
a translation of the same TF graph, so torch-fidelity's preprocessing is the one that matches.
torch-fidelity's constructor loads weights itself (``torch.load(weights_only=False)`` or a download): the file is
read here code-free (``torch.load(weights_only=True)`` or safetensors), checked against the network's keys and
shapes, and only then handed to the constructor as an in-memory copy of its tensors.

**EDM's ``inception-2015-12-05.pkl`` (the StyleGAN3 metric detector) is refused** with a one-line DataError naming
the .pth files above. EDM unpickles it with plain ``pickle.load`` and gets a callable module, so the file
carries or names its own classes (plain pickle cannot store a TorchScript module, which is what its StyleGAN2-ADA
predecessor ``inception-2015-12-05.pt`` was): its layout is not documented in any source we may read and no copy
is here, so no mapping onto torch-fidelity's keys could be verified.

**FD_DINOv2: DINOv2 ViT-L/14 from timm** (``vit_large_patch14_dinov2`` at 224×224, built on the meta device and
given the local file's tensors), preprocessed as the EDM2 paper describes: uint8 → bicubic resize to 224×224
(``F.interpolate``, antialias=True) → /255 → ImageNet mean/std; the feature is the CLS token after the final
LayerNorm (1024-d). The official ``dinov2_vitl14_pretrain.pth`` layout is mapped by timm's own
``checkpoint_filter_fn`` (drops ``mask_token``); a timm-format state dict passes through it unchanged.

*Position embeddings.* The checkpoints hold a 37×37 grid (trained at 518); at 224 the model needs 16×16. The DINOv2
reference (``DinoVisionTransformer.interpolate_pos_encoding``, built by torch.hub with interpolate_antialias=False,
interpolate_offset=0.1, which EDM2 uses) resamples at every forward: bicubic, antialias=False,
``scale_factor=(16 + 0.1)/37`` (the output is 16×16, but the sampling points follow the 37/16.1 step). timm's
filter resamples once at load: bicubic, antialias=True, ``size=(16, 16)`` (step 37/16). They differ: antialias
widens the kernel 2.3× when shrinking, and the offset moves the last sample by ~0.2 cells. The grid is therefore
resampled here the reference's way before timm's filter runs (which then finds it fitting and leaves it).
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError

from engine.errors import ConfigError, DataError, MissingFileError
from engine.files import read_tensor_file

METRICS = ("fid", "fd_dinov2")
FEATURE_DIMS = {"fid": 2048, "fd_dinov2": 1024}
WEIGHT_FILES = {
    "fid": "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (https://github.com/mseitzer/pytorch-fid/releases/"
           "download/fid_weights/pt_inception-2015-12-05-6726825d.pth) or torch-fidelity's "
           "weights-inception-2015-12-05-6726825d.pth (its v0.2.0 release); both hold the same network",
    "fd_dinov2": "DINOv2's dinov2_vitl14_pretrain.pth (https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/"
                 "dinov2_vitl14_pretrain.pth) or timm's vit_large_patch14_dinov2.lvd142m weights "
                 "(https://huggingface.co/timm/vit_large_patch14_dinov2.lvd142m)",
}
DINOV2_ARCH = "vit_large_patch14_dinov2"   # a module constant so that tests can run the same code on a smaller ViT
DINOV2_RESOLUTION = 224
DINOV2_POS_EMBED_OFFSET = 0.1              # the DINOv2 reference's interpolate_offset
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Detector(torch.nn.Module):
    """A metric's feature network with its own resizing and normalisation: uint8 images in, float32 features out."""

    def __init__(self, metric: str, network: torch.nn.Module, feature_dim: int):
        super().__init__()
        self.metric = metric
        self.feature_dim = feature_dim
        self.network = network.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [N, 3, H, W] (any H, W; a 1-channel batch is repeated to 3) -> float32 features [N, D]."""
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 \
                or images.shape[1] not in (1, 3):
            raise ValueError(f"{self.metric} detector takes uint8 images [N, 1 or 3, H, W], got "
                             f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")
        images = images.to(next(self.network.parameters()).device).expand(-1, 3, -1, -1)
        if self.metric == "fid":
            return self.network(images)[0]
        x = F.interpolate(images.float(), size=(DINOV2_RESOLUTION, DINOV2_RESOLUTION), mode="bicubic",
                          antialias=True) / 255
        x = (x - x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return self.network.forward_features(x)[:, 0]


def load_detector(metric: str, weights: str | Path, device="cpu") -> Detector:
    """The detector of `metric` with the weights of a local file (WEIGHT_FILES says which and where from)."""
    _check_metric(metric)
    path = Path(weights)
    state = _read_weights(path, metric)
    if metric == "fid":
        return _inception_detector(_fit(state, _inception_template(), path, metric)).to(device)
    with torch.device("meta"):           # no random init to overwrite: every weight comes from the file
        network = _dinov2_network()
    state = _dinov2_layout(_resample_pos_embed(state, network), network, path)
    network.load_state_dict(_fit(state, network.state_dict(), path, metric), assign=True)
    return Detector(metric, network, network.num_features).to(device)


def random_detector(metric: str, seed: int = 0, device="cpu") -> Detector:
    """The same network with seeded random weights (tests, the digits plumbing demo): NOT a metric detector.

    Initialised so that the features depend on the image: He-scaled convolutions and mildly perturbed BatchNorm
    statistics for Inception; timm's init for DINOv2 with its layer scales at 1 (DINOv2's hub models are built
    with init_values=1.0; timm's 1e-5 would leave the CLS token all but independent of the image).
    """
    _check_metric(metric)
    if metric == "fid":
        return _inception_detector(_random_inception_state(seed)).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = _dinov2_network()
    for name, parameter in network.named_parameters():
        if name.endswith((".ls1.gamma", ".ls2.gamma")):
            parameter.data.fill_(1.0)
    return Detector(metric, network, network.num_features).to(device)


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ConfigError(f"unknown metric '{metric}': choose one of {', '.join(METRICS)}")


# --------------------------------------------------------------------------------------------------
# Reading and checking weights
# --------------------------------------------------------------------------------------------------
def _read_weights(path: Path, metric: str) -> dict[str, torch.Tensor]:
    """The tensors of a .pth/.pt (zip or the legacy pre-1.6 format) or .safetensors file, read without running
    any code from it; one-line errors that say which file to get instead."""
    if not path.is_file():
        raise MissingFileError(f"{metric} detector weights '{path}' not found: get {WEIGHT_FILES[metric]}")
    if path.suffix == ".pkl":
        what = ("EDM/StyleGAN3's Inception detector pickle, whose network layout cannot be checked"
                if metric == "fid" else "a pickle, which is not read as detector weights")
        raise DataError(f"'{path}' is {what}: use {WEIGHT_FILES[metric]}")
    try:
        data = read_tensor_file(path)
    except pickle.UnpicklingError:      # torch's weights-only unpickler met something that is not a tensor
        raise DataError(f"'{path}' is not a torch.save file of tensors only (nothing from it was run): use "
                        f"{WEIGHT_FILES[metric]}") from None
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0]
        raise DataError(f"'{path}' is not a readable weights file ({first[:200]}): use {WEIGHT_FILES[metric]}") \
            from None
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise DataError(f"'{path}' holds no state dict of tensors: use {WEIGHT_FILES[metric]}")
    return dict(data)


def _fit(state: dict, expected: dict, path: Path, metric: str) -> dict[str, torch.Tensor]:
    """`state` with exactly the keys and shapes of `expected` (BatchNorm's unused batch counters filled in), or a
    one-line DataError that says what does not fit."""
    state = {k: v for k, v in state.items() if not (k.endswith("num_batches_tracked") and k not in expected)}
    state.update({k: torch.zeros((), dtype=torch.long) for k in expected
                  if k.endswith("num_batches_tracked") and k not in state})
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [f"{k} {list(state[k].shape)} vs {list(expected[k].shape)}" for k in expected
                if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or reshaped:
        found = (("missing keys", missing), ("unexpected keys", unexpected), ("of other shapes", reshaped))
        problems = [f"{len(items)} {what} (e.g. {items[0]})" for what, items in found if items]
        raise DataError(f"'{path}' does not fit the {metric} network: {', '.join(problems)}: use "
                        f"{WEIGHT_FILES[metric]}")
    return {k: state[k].to(expected[k].dtype) for k in expected}


# --------------------------------------------------------------------------------------------------
# Inception-v3 (torch-fidelity)
# --------------------------------------------------------------------------------------------------
def _inception_template() -> dict[str, torch.Tensor]:
    """Keys and shapes (meta tensors) of the FID Inception's state dict: torchvision's Inception3 with 1008 classes
    and no aux head, the layout both weight files use and torch-fidelity's network loads."""
    import torchvision

    with torch.device("meta"):
        network = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008,
                                                  init_weights=False)
    return network.state_dict()


def _inception_detector(state: dict[str, torch.Tensor]) -> Detector:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    buffer = io.BytesIO()
    torch.save(state, buffer)        # tensors only: the constructor's torch.load(weights_only=False) runs nothing
    buffer.seek(0)
    network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=buffer)
    return Detector("fid", network, FEATURE_DIMS["fid"])


def _random_inception_state(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def sample(name: str, shape: torch.Size) -> torch.Tensor:
        if name.endswith("num_batches_tracked"):
            return torch.zeros((), dtype=torch.long)
        noise = torch.randn(shape, generator=generator)
        if name.endswith(("bn.weight", "bn.running_var")):
            return 1 + 0.1 * noise.clamp(-3, 3)
        if name.endswith(("bn.bias", "bn.running_mean", "fc.bias")):
            return 0.1 * noise
        return noise * (2 / shape[1:].numel()) ** 0.5     # conv and fc weights: He-scaled, activations stay O(1)

    return {name: sample(name, like.shape) for name, like in _inception_template().items()}


# --------------------------------------------------------------------------------------------------
# DINOv2 (timm)
# --------------------------------------------------------------------------------------------------
def _dinov2_network() -> torch.nn.Module:
    import timm

    return timm.create_model(DINOV2_ARCH, pretrained=False, img_size=DINOV2_RESOLUTION, num_classes=0)


def _resample_pos_embed(state: dict[str, torch.Tensor], network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint's position grid resampled to the network's as the DINOv2 reference does it (see above)."""
    pos_embed = state.get("pos_embed")
    if pos_embed is None or pos_embed.ndim != 3 or pos_embed.shape[1] == network.pos_embed.shape[1]:
        return state
    prefix = network.num_prefix_tokens
    side = round((pos_embed.shape[1] - prefix) ** 0.5)
    rows, cols = network.patch_embed.grid_size
    if side * side != pos_embed.shape[1] - prefix:
        return state                 # not a square grid: _fit reports the shape
    grid = pos_embed[:, prefix:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, mode="bicubic", antialias=False, scale_factor=(
        (rows + DINOV2_POS_EMBED_OFFSET) / side, (cols + DINOV2_POS_EMBED_OFFSET) / side))
    grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
    return {**state, "pos_embed": torch.cat([pos_embed[:, :prefix].float(), grid], dim=1).to(pos_embed.dtype)}


def _dinov2_layout(state: dict[str, torch.Tensor], network: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """Official DINOv2 keys -> timm's, by timm's own checkpoint filter. A patch kernel of another size is refused
    first: the filter would resample it, and another patch size is another network."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    patch, expected = state.get("patch_embed.proj.weight"), network.patch_embed.proj.weight
    if patch is not None and patch.shape != expected.shape:
        raise DataError(f"'{path}' does not fit the fd_dinov2 network: patch_embed.proj.weight {list(patch.shape)} "
                        f"vs {list(expected.shape)}: use {WEIGHT_FILES['fd_dinov2']}")
    try:
        return checkpoint_filter_fn(dict(state), network)
    except (RuntimeError, ValueError, KeyError, IndexError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DataError(f"'{path}' does not fit the fd_dinov2 network ({first[:200]}): use "
                        f"{WEIGHT_FILES['fd_dinov2']}") from None
