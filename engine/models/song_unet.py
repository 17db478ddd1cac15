"""EDM's SongUNet (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"):
the DDPM++ / NCSN++ U-Nets of Song et al. 2021 as EDM configures them, written so that the released EDM
checkpoints (CIFAR-10, FFHQ, AFHQv2) load key for key and compute the same outputs.

- DDPM++ (VP): ``embedding_type="positional"``, ``encoder_type="standard"``, ``resample_filter=(1, 1)``.
- NCSN++ (VE): ``embedding_type="fourier"``, ``encoder_type="residual"`` (a progressive input path: the
  image is resampled alongside the encoder and added at every level), ``resample_filter=(1, 3, 3, 1)``,
  ``channel_mult_noise=2``.

The embedding is noise features (plus a linear map of the one-hot class, scaled by √label_dim, and of
the augmentation labels) through two SiLU linear layers. Blocks are GroupNorm-SiLU-conv ×2 with the
embedding added between the convs, resampling by a fixed FIR filter, residual sums scaled by √½ and
single-head self-attention where the side is in ``attn_resolutions``. Module and buffer names are the
released ones (``enc.32x32_block0.conv0.weight``, ``map_noise.freqs``, ``*.resample_filter`` ...).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.layers import group_norm, level_resolutions, network_inputs
from kernels.attention import scaled_dot_product_attention

SKIP_SCALE = math.sqrt(0.5)     # residual sums keep the variance of their inputs
FOURIER_SCALE = 16.0            # NCSN++'s random-frequency scale
ATTN_INIT = math.sqrt(0.2)      # xavier gain of the qkv projection
ZERO_INIT = 1e-5                # xavier gain of the layers closing a residual branch (≈ zero at init)
EMBEDDING_TYPES = ("positional", "fourier")
ENCODER_TYPES = ("standard", "residual")
DECODER_TYPES = ("standard",)


def _xavier_(weight: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """EDM initialises every layer xavier-uniform (bias zero), scaled by a per-layer gain."""
    return nn.init.xavier_uniform_(weight, gain=gain)


def _linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=bias)
    _xavier_(layer.weight)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class ResampleConv2d(nn.Module):
    """k×k conv ("same" padding) with an optional 2× resampling by the separable FIR ``resample_filter``.

    ``resample="down"`` filters with stride 2 before the conv, ``"up"`` upsamples by the transposed filter
    (×4, so a constant image stays constant) before it; ``conv_first`` (down only) convolves at full
    resolution and then filters, as NCSN++'s input path does. The filter is a buffer of the state dict.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, resample: str | None = None,
                 resample_filter=(1, 1), conv_first: bool = False, init_gain: float = 1.0):
        super().__init__()
        if resample not in (None, "up", "down") or (conv_first and resample != "down"):
            raise ValueError(f"resample must be None, 'up' or 'down' (conv_first only with 'down'), got {resample}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.resample, self.conv_first = resample, conv_first
        self.weight = nn.Parameter(_xavier_(torch.empty(out_channels, in_channels, kernel, kernel), init_gain))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        if resample:
            f = torch.as_tensor(resample_filter, dtype=torch.float32)
            self.register_buffer("resample_filter", (f.outer(f) / f.sum().square())[None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.to(x.dtype), self.bias.to(x.dtype)[None, :, None, None]
        pad = w.shape[-1] // 2
        if self.resample is None:
            return F.conv2d(x, w, padding=pad) + b
        f = self.resample_filter.to(x.dtype)
        f_pad = (f.shape[-1] - 1) // 2
        if self.conv_first:
            x = F.conv2d(x, w, padding=pad + f_pad)
            return F.conv2d(x, f.tile(self.out_channels, 1, 1, 1), groups=self.out_channels, stride=2) + b
        if self.resample == "up":
            x = F.conv_transpose2d(x, (f * 4).tile(self.in_channels, 1, 1, 1), groups=self.in_channels,
                                   stride=2, padding=f_pad)
        else:
            x = F.conv2d(x, f.tile(self.in_channels, 1, 1, 1), groups=self.in_channels, stride=2, padding=f_pad)
        return F.conv2d(x, w, padding=pad) + b


class PositionalEmbedding(nn.Module):
    """DDPM++'s transformer sinusoids of the noise label, frequencies (1/max_positions)^(i/(n/2 − 1))
    (``endpoint``: the last one is exactly 1/max_positions). Emitted as [sin, cos]: SongUNet swaps the
    halves of [cos, sin], and the released weights expect that order. Frequencies are formed in float32
    whatever the label's dtype, as the released code does."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = True):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, label: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=label.device) / (half - int(self.endpoint))
        freqs = (1 / self.max_positions) ** freqs
        args = torch.outer(label, freqs.to(label.dtype))
        return torch.cat([args.sin(), args.cos()], dim=1)


class FourierEmbedding(nn.Module):
    """NCSN++'s random Fourier features [sin, cos](2π·f·label), f ~ N(0, scale²) fixed at construction
    and saved in the state dict (``freqs``): a checkpoint's embedding must be reproduced exactly."""

    def __init__(self, num_channels: int, scale: float = FOURIER_SCALE):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, label: torch.Tensor) -> torch.Tensor:
        args = torch.outer(label, (2 * math.pi * self.freqs).to(label.dtype))
        return torch.cat([args.sin(), args.cos()], dim=1)


class SongBlock(nn.Module):
    """GroupNorm-SiLU-conv, + affine(embedding), GroupNorm-SiLU-dropout-conv, + skip (a 1×1 conv when the
    width changes or the block resamples), ×√½; then optionally self-attention, + input, ×√½.

    Attention follows the released layout: the qkv conv's channels are (head, c, 3) and the tokens
    attend over all H·W positions with softmax(q·kᵀ/√c).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, resample: str | None = None,
                 attention: bool = False, num_heads: int = 1, dropout: float = 0.0, resample_filter=(1, 1)):
        super().__init__()
        if attention and out_channels % num_heads:
            raise ValueError(f"out_channels {out_channels} not divisible by num_heads {num_heads}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_heads = num_heads if attention else 0
        self.dropout = dropout
        resampling = {"resample": resample, "resample_filter": resample_filter}
        self.norm0 = group_norm(in_channels)
        self.conv0 = ResampleConv2d(in_channels, out_channels, 3, **resampling)
        self.affine = _linear(emb_channels, out_channels)
        self.norm1 = group_norm(out_channels)
        self.conv1 = ResampleConv2d(out_channels, out_channels, 3, init_gain=ZERO_INIT)
        self.skip = None
        if in_channels != out_channels or resample:
            self.skip = ResampleConv2d(in_channels, out_channels, 1, **resampling)
        if attention:
            self.norm2 = group_norm(out_channels)
            self.qkv = ResampleConv2d(out_channels, out_channels * 3, 1, init_gain=ATTN_INIT)
            self.proj = ResampleConv2d(out_channels, out_channels, 1, init_gain=ZERO_INIT)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        h = F.silu(self.norm1(h + self.affine(emb)[:, :, None, None].to(h.dtype)))
        h = self.conv1(F.dropout(h, self.dropout, self.training))
        x = (h + (x if self.skip is None else self.skip(x))) * SKIP_SCALE
        if self.num_heads:
            b, c, hh, ww = x.shape
            qkv = self.qkv(self.norm2(x)).reshape(b, self.num_heads, c // self.num_heads, 3, hh * ww)
            q, k, v = qkv.permute(3, 0, 1, 4, 2).unbind(0)                  # [B, heads, HW, c]
            a = scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, hh, ww)
            x = (self.proj(a) + x) * SKIP_SCALE
        return x


class SongUNet(nn.Module):
    """EDM's SongUNet. Levels at img_resolution / 2^i with model_channels·channel_mult[i] channels; per
    encoder level a downsampling block (below the top), ``num_blocks`` blocks and, for
    ``encoder_type="residual"``, the resampled input path; a 2-block bottleneck with attention; per decoder
    level an upsampling block (below the bottom) and ``num_blocks + 1`` blocks fed by concatenated skips,
    attention in the last of them where the side is in ``attn_resolutions``; GroupNorm-SiLU-conv out.

    forward(x, noise_label, r_label=None, class_labels=None, augment_labels=None): ``noise_label`` [B] or
    scalar (EDM's c_noise = ln σ/4); ``class_labels`` int [B] in [0, label_dim], ``label_dim`` (or None)
    being the null label, embedded as the released all-zero one-hot; ``augment_labels`` [B, augment_dim]
    or None (no augmentation term, as when sampling). ``use_r`` (MeanFlow's second time) is not supported.
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult=(1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions=(16,), dropout: float = 0.10,
                 label_dropout: float = 0.0, embedding_type: str = "positional", channel_mult_noise: int = 1,
                 encoder_type: str = "standard", decoder_type: str = "standard", resample_filter=(1, 1),
                 use_r: bool = False):
        super().__init__()
        if use_r:
            raise NotImplementedError("SongUNet has no second time input (use_r): MeanFlow students are DiTs")
        for name, value, allowed in [("embedding_type", embedding_type, EMBEDDING_TYPES),
                                     ("encoder_type", encoder_type, ENCODER_TYPES),
                                     ("decoder_type", decoder_type, DECODER_TYPES)]:
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed} (the released EDM settings), got {value!r}")
        levels = len(channel_mult)
        resolutions = level_resolutions(img_resolution, levels, attn_resolutions)
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.label_dim, self.augment_dim, self.label_dropout = label_dim, augment_dim, label_dropout
        self.use_r = False
        noise_channels = model_channels * channel_mult_noise
        emb_channels = model_channels * channel_mult_emb
        block = {"emb_channels": emb_channels, "dropout": dropout, "resample_filter": resample_filter}

        self.map_noise = (PositionalEmbedding(noise_channels) if embedding_type == "positional"
                          else FourierEmbedding(noise_channels))
        self.map_label = _linear(label_dim, noise_channels) if label_dim else None
        self.map_augment = _linear(augment_dim, noise_channels, bias=False) if augment_dim else None
        self.map_layer0 = _linear(noise_channels, emb_channels)
        self.map_layer1 = _linear(emb_channels, emb_channels)

        self.enc = nn.ModuleDict()
        cout, caux = in_channels, in_channels
        for level, (mult, res) in enumerate(zip(channel_mult, resolutions)):
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = ResampleConv2d(cin, cout, 3)
            else:
                self.enc[f"{res}x{res}_down"] = SongBlock(cout, cout, resample="down", **block)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = ResampleConv2d(
                        caux, cout, 3, resample="down", resample_filter=resample_filter, conv_first=True)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = SongBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block)

        skips = [m.out_channels for name, m in self.enc.items() if "aux" not in name]
        self.dec = nn.ModuleDict()
        for level in reversed(range(levels)):
            mult, res = channel_mult[level], resolutions[level]
            if level == levels - 1:
                self.dec[f"{res}x{res}_in0"] = SongBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = SongBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = SongBlock(cout, cout, resample="up", **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attention = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = SongBlock(cin, cout, attention=attention, **block)
        top = resolutions[0]
        self.dec[f"{top}x{top}_aux_norm"] = group_norm(cout)
        self.dec[f"{top}x{top}_aux_conv"] = ResampleConv2d(cout, out_channels, 3, init_gain=ZERO_INIT)

    def embedding(self, noise_label: torch.Tensor, class_labels=None, augment_labels=None) -> torch.Tensor:
        """The block conditioning [B, emb_channels] (after its final SiLU)."""
        dtype = self.map_layer0.weight.dtype
        noise_label = noise_label.to(torch.promote_types(noise_label.dtype, torch.float32))
        emb = self.map_noise(noise_label).to(dtype)
        batch = emb.shape[0]
        if self.map_label is not None:
            onehot = self._one_hot(class_labels, batch, emb.device).to(dtype)
            if self.training and self.label_dropout:
                onehot = onehot * (torch.rand(batch, 1, device=emb.device) >= self.label_dropout).to(dtype)
            emb = emb + self.map_label(onehot * math.sqrt(self.label_dim))
        elif class_labels is not None:
            raise ValueError("class_labels given but the network was built with label_dim=0")
        if augment_labels is not None:
            if self.map_augment is None:
                raise ValueError("augment_labels given but the network was built with augment_dim=0")
            if augment_labels.shape != (batch, self.augment_dim):
                raise ValueError(f"expected augment_labels [{batch}, {self.augment_dim}], "
                                 f"got {tuple(augment_labels.shape)}")
            emb = emb + self.map_augment(augment_labels.to(dtype))
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def _one_hot(self, class_labels, batch: int, device) -> torch.Tensor:
        """Int labels [B] as the released float one-hot; label_dim (the null label) is the all-zero row."""
        if class_labels is None:
            return torch.zeros(batch, self.label_dim, device=device)
        if class_labels.shape != (batch,) or class_labels.is_floating_point():
            raise ValueError(f"expected integer class_labels of shape [{batch}], got {class_labels.dtype} "
                             f"{tuple(class_labels.shape)}")
        return F.one_hot(class_labels.long(), self.label_dim + 1)[:, :self.label_dim]

    def forward(self, x: torch.Tensor, noise_label, r_label=None, class_labels=None,
                augment_labels=None) -> torch.Tensor:
        if r_label is not None:
            raise ValueError("r_label given but SongUNet has no second time input (use_r=False)")
        noise_label, _ = network_inputs(x, self.in_channels, self.img_resolution, noise_label)
        emb = self.embedding(noise_label, class_labels, augment_labels)

        skips, aux = [], x
        for name, block in self.enc.items():
            if name.endswith("_aux_residual"):
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x) if name.endswith("_conv") else block(x, emb)
                skips.append(x)
        for name, block in self.dec.items():
            if name.endswith("_aux_norm"):
                x = F.silu(block(x))
            elif name.endswith("_aux_conv"):
                x = block(x)
            else:
                if "_block" in name:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return x
