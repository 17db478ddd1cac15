"""ADM, the U-Net of Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs on Image Synthesis"), in the form EDM
(Karras et al. 2022) trained it on ImageNet-64 (``edm-imagenet-64x64-cond-adm``), re-derived from the papers.

State-dict names and shapes are those of EDM's ``DhariwalUNet`` (the ``model.`` part of its ``EDMPrecond``), so
the released checkpoint loads once that prefix is stripped, and the forward computes what the original computes
(tests/models/test_adm.py checks both against fixtures made with the original code). Differences from the
DDPM++ U-Net in engine/models/unet.py that matter for that: residual sums are not rescaled, GroupNorm uses
eps 1e-5, the noise label's features are [cos, sin] of 10000^(-i/(C/2)) with i < C/2, the class enters as a
bias-free linear map of its one-hot vector added after the second embedding layer, attention has
C // 64 heads (none below 64 channels) with the qkv channels laid out (head, channel, q/k/v), and resampling
goes through a stored 2×2 filter buffer (``resample_filter``), which the checkpoints contain.
"""

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.layers import level_resolutions, network_inputs
from kernels.attention import scaled_dot_product_attention

CHANNELS_PER_HEAD = 64
GROUPNORM_EPS = 1e-5
MAX_POSITIONS = 10000


def adm_group_norm(channels: int) -> nn.GroupNorm:
    """EDM's GroupNorm: up to 32 groups of at least 4 channels, eps 1e-5."""
    return nn.GroupNorm(min(32, channels // 4), channels, eps=GROUPNORM_EPS)


def positional_features(label: torch.Tensor, channels: int) -> torch.Tensor:
    """[cos(label·f), sin(label·f)], f_i = 10000^(-i/(channels/2)) for i < channels/2 (no endpoint), the
    frequencies rounded to float32 as in the original and the product taken in the label's precision
    (at least float32)."""
    half = channels // 2
    freqs = (1 / MAX_POSITIONS) ** (torch.arange(half, dtype=torch.float32, device=label.device) / half)
    dtype = torch.promote_types(label.dtype, torch.float32)
    args = torch.outer(label.to(dtype), freqs.to(dtype))
    return torch.cat([args.cos(), args.sin()], dim=1)


def _box_filter() -> torch.Tensor:
    """The [1, 1, 2, 2] filter the checkpoints store for 2× resampling: 1/4 everywhere."""
    return torch.full((1, 1, 2, 2), 0.25)


def _resample(x: torch.Tensor, filt: torch.Tensor, mode: str) -> torch.Tensor:
    """2× down (the filter's weighted 2×2 mean, stride 2) or up (each pixel spread by 4·filter, i.e. nearest
    neighbour), per channel."""
    c = x.shape[1]
    filt = filt.to(x.dtype).tile(c, 1, 1, 1)
    if mode == "down":
        return F.conv2d(x, filt, groups=c, stride=2)
    return F.conv_transpose2d(x, filt * 4, groups=c, stride=2)


class Resample(nn.Module):
    """The skip path of a resampling block of constant width: resampling only (the filter is its one tensor)."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.register_buffer("resample_filter", _box_filter())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _resample(x, self.resample_filter, self.mode)


class ResampleConv2d(nn.Conv2d):
    """Resample 2×, then a same-padded conv; the filter is saved next to the conv's weight and bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, mode: str):
        super().__init__(in_channels, out_channels, kernel, padding=kernel // 2)
        self.mode = mode
        self.register_buffer("resample_filter", _box_filter())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_resample(x, self.resample_filter, self.mode))


def _conv(in_channels: int, out_channels: int, kernel: int, resample: str | None) -> nn.Module:
    if resample:
        return ResampleConv2d(in_channels, out_channels, kernel, resample)
    return nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2)


def _zero_(*modules: nn.Module) -> None:
    """Zero a residual branch's last layer, so the block starts as its skip path (ADM's init)."""
    for m in modules:
        nn.init.zeros_(m.weight)
        nn.init.zeros_(m.bias)


class ADMBlock(nn.Module):
    """GroupNorm-SiLU-(resample)-conv3×3, adaptive scale/shift from the embedding, GroupNorm-SiLU-dropout-conv3×3,
    plus the skip path (resampled, 1×1 conv if the width changes); then, with ``attention`` and at least 64
    channels, self-attention over the pixels added residually. Sums are not rescaled (ADM)."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, resample: str | None = None,
                 attention: bool = False, dropout: float = 0.0):
        super().__init__()
        self.in_channels, self.out_channels, self.dropout = in_channels, out_channels, dropout
        self.num_heads = out_channels // CHANNELS_PER_HEAD if attention else 0
        self.norm0 = adm_group_norm(in_channels)
        self.conv0 = _conv(in_channels, out_channels, 3, resample)
        self.affine = nn.Linear(emb_channels, 2 * out_channels)
        self.norm1 = adm_group_norm(out_channels)
        self.conv1 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        _zero_(self.conv1)
        if in_channels != out_channels:
            self.skip = _conv(in_channels, out_channels, 1, resample)
        else:
            self.skip = Resample(resample) if resample else None
        if self.num_heads:
            self.norm2 = adm_group_norm(out_channels)
            self.qkv = nn.Conv2d(out_channels, 3 * out_channels, 1)
            self.proj = nn.Conv2d(out_channels, out_channels, 1)
            _zero_(self.proj)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        scale, shift = self.affine(emb)[:, :, None, None].to(h.dtype).chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(F.dropout(h, self.dropout, self.training))
        x = h + (self.skip(x) if self.skip is not None else x)
        if self.num_heads:
            b, c, hh, ww = x.shape
            d = c // self.num_heads
            q, k, v = self.qkv(self.norm2(x)).reshape(b, self.num_heads, d, 3, hh * ww).transpose(2, 4).unbind(3)
            a = scaled_dot_product_attention(q, k, v)                      # [B, heads, HW, d]
            x = x + self.proj(a.transpose(2, 3).reshape(b, c, hh, ww))
        return x


class DhariwalUNet(nn.Module):
    """EDM's ADM: levels at img_resolution / 2^i with model_channels·channel_mult[i] channels, a 3×3 input conv,
    ``num_blocks`` blocks per level (plus a downsampling block below the top), a 2-block bottleneck (the first
    with attention), ``num_blocks + 1`` decoder blocks per level fed by concatenated skips (plus an upsampling
    block), attention in the blocks whose side is in ``attn_resolutions`` (other sides listed there are ignored,
    as by the original: its defaults must build at any resolution).

    forward(x, noise_label, r_label=None, class_labels=None, augment_labels=None): ``noise_label`` [B] (or a
    scalar) is embedded as given (EDM passes ln σ/4). ``class_labels`` are int [B] in 0..label_dim, the value
    ``label_dim`` (and None) being the null class, embedded as the original's all-zero one-hot row;
    ``label_dropout`` nulls labels at that rate in training. ``augment_labels`` [B, augment_dim] are EDM's
    augmentation conditioning, none meaning zeros. MeanFlow's second time input (``use_r``) is not built.
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 192, channel_mult=(1, 2, 3, 4), channel_mult_emb: int = 4,
                 num_blocks: int = 3, attn_resolutions=(32, 16, 8), dropout: float = 0.10, label_dropout: float = 0.0,
                 use_r: bool = False):
        super().__init__()
        if use_r:
            raise NotImplementedError("DhariwalUNet has no second time input (use_r=True)")
        levels = len(channel_mult)
        resolutions = level_resolutions(img_resolution, levels)
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.label_dim, self.augment_dim, self.label_dropout = label_dim, augment_dim, label_dropout
        self.model_channels, self.use_r = model_channels, use_r
        emb_channels = model_channels * channel_mult_emb

        self.map_augment = nn.Linear(augment_dim, model_channels, bias=False) if augment_dim else None
        if self.map_augment is not None:
            nn.init.zeros_(self.map_augment.weight)
        self.map_layer0 = nn.Linear(model_channels, emb_channels)
        self.map_layer1 = nn.Linear(emb_channels, emb_channels)
        self.map_label = nn.Linear(label_dim, emb_channels, bias=False) if label_dim else None
        if self.map_label is not None:
            nn.init.normal_(self.map_label.weight)    # unit std: a one-hot moves the embedding at full scale

        block = dict(emb_channels=emb_channels, dropout=dropout)
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, (mult, res) in enumerate(zip(channel_mult, resolutions)):
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = nn.Conv2d(cin, cout, 3, padding=1)
            else:
                self.enc[f"{res}x{res}_down"] = ADMBlock(cout, cout, resample="down", **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = ADMBlock(cin, cout, attention=res in attn_resolutions, **block)

        skips = [m.out_channels for m in self.enc.values()]
        self.dec = nn.ModuleDict()
        for level in reversed(range(levels)):
            res = resolutions[level]
            if level == levels - 1:
                self.dec[f"{res}x{res}_in0"] = ADMBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = ADMBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = ADMBlock(cout, cout, resample="up", **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * channel_mult[level]
                self.dec[f"{res}x{res}_block{idx}"] = ADMBlock(cin, cout, attention=res in attn_resolutions, **block)
        self.out_norm = adm_group_norm(cout)
        self.out_conv = nn.Conv2d(cout, out_channels, 3, padding=1)
        _zero_(self.out_conv)

    def embedding(self, noise_label: torch.Tensor, class_labels, augment_labels) -> torch.Tensor:
        """[B, emb_channels]: silu(map_layer1(silu(map_layer0(features + augment))) + map_label(one-hot))."""
        dtype = self.map_layer0.weight.dtype
        emb = positional_features(noise_label, self.model_channels).to(dtype)
        if self.map_augment is not None:
            if augment_labels is not None:
                if augment_labels.shape != (noise_label.shape[0], self.augment_dim):
                    raise ValueError(f"expected augment_labels [{noise_label.shape[0]}, {self.augment_dim}], "
                                     f"got {tuple(augment_labels.shape)}")
                emb = emb + self.map_augment(augment_labels.to(dtype))
        elif augment_labels is not None:
            raise ValueError("augment_labels given but the network was built with augment_dim=0")
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            if class_labels is None:
                class_labels = torch.full_like(noise_label, self.label_dim, dtype=torch.long)
            if class_labels.shape != noise_label.shape or class_labels.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"expected int class_labels [{noise_label.shape[0]}], got "
                                 f"{class_labels.dtype} {tuple(class_labels.shape)}")
            onehot = F.one_hot(class_labels.long(), self.label_dim + 1)[:, :self.label_dim].to(dtype)
            if self.training and self.label_dropout:
                onehot = onehot * (torch.rand_like(onehot[:, :1]) >= self.label_dropout).to(dtype)
            emb = emb + self.map_label(onehot)
        elif class_labels is not None:
            raise ValueError("class_labels given but the network was built with label_dim=0")
        return F.silu(emb)

    def forward(self, x: torch.Tensor, noise_label, r_label=None, class_labels=None,
                augment_labels=None) -> torch.Tensor:
        noise_label, r_label = network_inputs(x, self.in_channels, self.img_resolution, noise_label, r_label)
        if r_label is not None:
            raise ValueError("r_label given but DhariwalUNet has no second time input (use_r=False)")
        emb = self.embedding(noise_label, class_labels, augment_labels)
        skips = []
        for name, blk in self.enc.items():
            x = blk(x) if name.endswith("_conv") else blk(x, emb)
            skips.append(x)
        for name, blk in self.dec.items():
            if "_block" in name:
                x = torch.cat([x, skips.pop()], dim=1)
            x = blk(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))
