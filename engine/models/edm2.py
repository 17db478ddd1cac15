"""The EDM2 magnitude-preserving U-Net (Karras et al. 2024, "Analyzing and Improving the Training Dynamics
of Diffusion Models", config G), re-derived from the paper's description.

Every layer is built so that unit-variance inputs give unit-variance outputs at init *and* throughout
training, which is what lets EDM2 drop normalisation layers and keep the effective learning rate steady:

- :class:`MPConv` — conv / linear without bias whose weight rows are normalised to unit norm in every
  forward (weight normalisation) and, in training mode, also *written back* normalised to unit RMS
  before use ("forced weight normalisation"), so the stored norms cannot grow; an optional gain scales
  the output (the learned gains start at zero where a branch must start silent).
- :func:`mp_silu` (SiLU / 0.596, the RMS of SiLU of a unit normal), :func:`mp_sum` (lerp rescaled to
  unit variance), :func:`mp_cat` (concatenation weighted so both parts keep their share of the variance),
  :func:`pixel_norm` (unit RMS over channels, applied to the encoder's residual stream and to q, k, v).
- :class:`MPFourier` — the noise label's embedding: cos(2π(f·c + φ))·√2 with fixed random f ~ N(0, 1).

Module and parameter names follow the published EDM2 networks (``enc.64x64_block0.conv_res0.weight``,
``emb_noise.weight``, ``out_gain`` ...) so their state dicts import with ``cmt-import-weights``
(engine.models.weights) once the wrapper's prefix is stripped; the attention's qkv channel layout follows
theirs for the same reason.
EDM2's loss-weighting head (the learned log-variance) is not part of the denoiser and is left out.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.layers import level_resolutions, network_inputs
from kernels.attention import scaled_dot_product_attention

# Published sizes (EDM2 paper, Table 2): model channels per preset; channel_mult [1, 2, 3, 4], 3 blocks per
# encoder level, attention at 16x16 and 8x8 for all of them.
EDM2_SIZES = {"xs": 128, "s": 192, "m": 256, "l": 320, "xl": 384, "xxl": 448}
SILU_RMS = 0.596   # root mean square of silu(z), z ~ N(0, 1)


def pixel_norm(x: torch.Tensor, dim=1, eps: float = 1e-4) -> torch.Tensor:
    """x divided by its RMS over `dim` (+eps): every vector along `dim` gets unit mean square."""
    n = x.shape[dim] if isinstance(dim, int) else math.prod(x.shape[d] for d in dim)
    rms = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32) / math.sqrt(n)
    return x / (eps + rms).to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) / SILU_RMS


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """(1−t)·a + t·b rescaled so two independent unit-variance inputs give a unit-variance output."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Channel concatenation where `b` carries share t of the output's variance whatever the channel
    counts, and the whole stays unit-variance."""
    na, nb = a.shape[1], b.shape[1]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], dim=1)


class MPFourier(nn.Module):
    """cos(2π(f·c + φ))·√2: unit-variance features of a scalar label. f and φ are fixed random buffers,
    saved with the weights (a teacher's embedding must be reproduced exactly)."""

    def __init__(self, channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels))

    def forward(self, label: torch.Tensor) -> torch.Tensor:
        return torch.cos(torch.outer(label.float(), self.freqs.float()) + self.phases.float()) * math.sqrt(2)


# Learned gains are shape [1], not EDM2's scalars: DeepSpeed's parameter broadcast (ZeRO >= 1) views each
# parameter as bytes, which fails for 0-d tensors. engine.models.weights reshapes published scalars.


class MPConv(nn.Module):
    """Magnitude-preserving conv (``kernel=(k, k)``) or linear layer (``kernel=()``), no bias.

    Forward uses weight/‖row‖ (unit-norm rows, so unit-variance inputs give unit-variance outputs) times
    `gain`. In training mode the stored weight is first overwritten by itself normalised to unit RMS per
    row (forced weight normalisation): gradients are then orthogonal to the stored rows and the update
    size relative to the weight stays fixed, the paper's fix for drifting effective learning rates.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, ...] = ()):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    @staticmethod
    def normalize_weight(w: torch.Tensor) -> torch.Tensor:
        """w with unit-RMS rows: what forced weight normalisation stores. The trainer also applies it
        to DeepSpeed's fp32 master copy after each optimizer step (engine/trainer/student.py)."""
        return pixel_norm(w, tuple(range(1, w.ndim)))

    def forward(self, x: torch.Tensor, gain=1.0) -> torch.Tensor:
        w = self.weight.float()
        dims = tuple(range(1, w.ndim))
        if self.training:
            with torch.no_grad():
                self.weight.copy_(pixel_norm(w, dims))
        fan_in = w[0].numel()
        w = (pixel_norm(w, dims) * (gain / math.sqrt(fan_in))).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


class Block(nn.Module):
    """EDM2 residual block. ``flavor='enc'``: resample, 1×1 skip conv if the width changes, pixel norm of
    the residual stream, then the branch; ``'dec'``: the branch reads the (concatenated) input and the
    skip conv is applied to the stream afterwards. Branch: MP-SiLU → 3×3 → ·(1 + gain·emb) → MP-SiLU →
    dropout → 3×3, merged with mp_sum(t=0.3); optional attention with pixel-normed q, k, v (cosine
    attention) merged the same way; activations clipped to ±256 (a guard for half precision)."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample: str | None = None, attention: bool = False, channels_per_head: int = 64,
                 dropout: float = 0.0, res_balance: float = 0.3, attn_balance: float = 0.3, clip_act: float = 256):
        super().__init__()
        self.flavor, self.resample, self.dropout = flavor, resample, dropout
        self.res_balance, self.attn_balance, self.clip_act = res_balance, attn_balance, clip_act
        self.num_heads = out_channels // channels_per_head if attention else 0
        if attention and self.num_heads == 0:
            raise ValueError(f"attention needs at least {channels_per_head} channels, the block has {out_channels}")
        self.emb_gain = nn.Parameter(torch.zeros(1))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, (3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels)
        self.conv_res1 = MPConv(out_channels, out_channels, (3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, (1, 1)) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, (1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, (1, 1)) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            x = F.avg_pool2d(x, 2)
        elif self.resample == "up":
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = pixel_norm(x)
        y = self.conv_res0(mp_silu(x))
        scale = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * scale[:, :, None, None].to(y.dtype))
        y = F.dropout(y, self.dropout, self.training)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, self.res_balance)
        if self.num_heads:
            b, c, h, w = x.shape
            qkv = pixel_norm(self.attn_qkv(x).reshape(b, self.num_heads, c // self.num_heads, 3, h * w), dim=2)
            q, k, v = (t.transpose(2, 3) for t in qkv.unbind(3))          # [B, heads, HW, d]
            y = scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, h, w)
            x = mp_sum(x, self.attn_proj(y), self.attn_balance)
        return x.clamp(-self.clip_act, self.clip_act) if self.clip_act else x


class _IntervalEmbedding(nn.Module):
    """MeanFlow's second time input: Fourier features of t − r through an MP linear layer whose output
    gain starts at zero, so a use_r network starts equal to its use_r=False source for every r."""

    def __init__(self, noise_channels: int, emb_channels: int):
        super().__init__()
        self.fourier = MPFourier(noise_channels)
        self.linear = MPConv(noise_channels, emb_channels)
        self.gain = nn.Parameter(torch.zeros(1))

    def forward(self, interval: torch.Tensor) -> torch.Tensor:
        return self.linear(self.fourier(interval), gain=self.gain)


class EDM2UNet(nn.Module):
    """The EDM2 U-Net: levels at img_resolution / 2^i with model_channels·channel_mult[i] channels,
    ``num_blocks`` encoder blocks per level (plus a downsampling block below the top), a 2-block bottleneck
    with attention, ``num_blocks + 1`` decoder blocks per level fed by mp_cat skips, attention where the
    side is in ``attn_resolutions``. A constant-one channel is appended to the input (lets the first conv
    see the image border); the output gain starts at zero, so the net starts by predicting 0.

    Same contract as :class:`engine.models.unet.UNet`: forward(x, noise_label, r_label=None,
    class_labels=None). Class labels are ints [B]; value ``num_classes`` (or None) is the null class,
    embedded as an all-zero one-hot. With ``use_r`` the net also embeds t − r (MeanFlow's u(z, r, t)).
    """

    def __init__(self, img_resolution: int = 16, in_channels: int = 4, out_channels: int | None = None,
                 model_channels: int = 64, channel_mult=(1, 2, 3, 4), num_blocks: int = 3,
                 attn_resolutions=(16, 8), dropout: float = 0.0, num_classes: int = 0, use_r: bool = False,
                 channels_per_head: int = 64, label_balance: float = 0.5, concat_balance: float = 0.5):
        super().__init__()
        levels = len(channel_mult)
        resolutions = level_resolutions(img_resolution, levels)
        self.img_resolution, self.in_channels = img_resolution, in_channels
        self.out_channels = out_channels or in_channels
        self.num_classes, self.use_r = num_classes, use_r
        self.label_balance, self.concat_balance = label_balance, concat_balance
        cblock = [model_channels * m for m in channel_mult]
        cnoise, cemb = cblock[0], max(cblock)

        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb)
        self.r_embed = _IntervalEmbedding(cnoise, cemb) if use_r else None
        self.emb_label = MPConv(num_classes, cemb) if num_classes else None
        block = dict(emb_channels=cemb, channels_per_head=channels_per_head, dropout=dropout)

        self.enc = nn.ModuleDict()
        cout = in_channels + 1
        for level, (ch, res) in enumerate(zip(cblock, resolutions)):
            if level == 0:
                cin, cout = cout, ch
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, (3, 3))
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, flavor="enc", resample="down", **block)
            for idx in range(num_blocks):
                cin, cout = cout, ch
                self.enc[f"{res}x{res}_block{idx}"] = Block(cin, cout, flavor="enc",
                                                            attention=res in attn_resolutions, **block)

        skips = [_width(m) for m in self.enc.values()]
        self.dec = nn.ModuleDict()
        for level in reversed(range(levels)):
            ch, res = cblock[level], resolutions[level]
            if level == levels - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, flavor="dec", attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, flavor="dec", **block)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, flavor="dec", resample="up", **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), ch
                self.dec[f"{res}x{res}_block{idx}"] = Block(cin, cout, flavor="dec",
                                                            attention=res in attn_resolutions, **block)
        self.out_conv = MPConv(cout, self.out_channels, (3, 3))
        self.out_gain = nn.Parameter(torch.zeros(1))

    def zero_r_branch(self) -> None:
        """Zero the interval embedding's gain: a net loaded from use_r=False weights computes exactly them."""
        if self.r_embed is None:
            raise ValueError("this network was built with use_r=False: it has no r-embedding")
        with torch.no_grad():
            self.r_embed.gain.zero_()

    def forward(self, x: torch.Tensor, noise_label, r_label=None, class_labels=None) -> torch.Tensor:
        noise_label, r_label = network_inputs(x, self.in_channels, self.img_resolution, noise_label, r_label)
        emb = self.emb_noise(self.emb_fourier(noise_label))
        if self.r_embed is not None:
            if r_label is None:
                raise ValueError("this network was built with use_r=True: pass r_label")
            emb = emb + self.r_embed(noise_label - r_label)
        elif r_label is not None:
            raise ValueError("r_label given but the network was built with use_r=False")
        if self.emb_label is not None:
            if class_labels is None:
                class_labels = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            onehot = F.one_hot(class_labels, self.num_classes + 1)[:, :self.num_classes].float()
            emb = mp_sum(emb, self.emb_label(onehot * math.sqrt(self.num_classes)), self.label_balance)
        elif class_labels is not None:
            raise ValueError("class_labels given but the network was built with num_classes=0")
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, blk in self.enc.items():
            x = blk(x) if name.endswith("_conv") else blk(x, emb)
            skips.append(x)
        for name, blk in self.dec.items():
            if "_block" in name:
                x = mp_cat(x, skips.pop(), self.concat_balance)
            x = blk(x, emb)
        return self.out_conv(x, gain=self.out_gain)


def _width(module: nn.Module) -> int:
    """Output channels of an encoder entry (a first conv or a block)."""
    return module.out_channels if isinstance(module, MPConv) else module.conv_res1.out_channels
