"""A small DDPM++-style U-Net (the EDM pixel-space backbone, re-derived at toy scale)."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.layers import ConditionEmbedding, SelfAttention, group_norm, level_resolutions, network_inputs

SKIP_SCALE = math.sqrt(0.5)  # keeps the variance of residual sums ≈ that of their inputs


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv ×2 with an adaptive scale/shift from the embedding, optional 2× resampling
    on both paths, and optional self-attention after the residual sum."""

    def __init__(self, cin: int, cout: int, emb_dim: int, resample: str | None = None, dropout: float = 0.0,
                 attention: bool = False, channels_per_head: int = 64):
        super().__init__()
        self.resample = resample
        self.norm0 = group_norm(cin)
        self.conv0 = nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb_dim, 2 * cout)
        self.norm1 = group_norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv1.weight)  # residual branch starts at zero
        nn.init.zeros_(self.conv1.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None
        if attention:
            self.norm2 = group_norm(cout)
            self.attn = SelfAttention(cout, max(1, cout // channels_per_head))
        else:
            self.attn = None

    def _resample(self, x):
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(self._resample(F.silu(self.norm0(x))))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(self.dropout(h))
        skip = self._resample(x)
        if self.skip is not None:
            skip = self.skip(skip)
        x = (h + skip) * SKIP_SCALE
        if self.attn is not None:
            b, c, hh, ww = x.shape
            tokens = self.norm2(x).flatten(2).transpose(1, 2)
            x = (x + self.attn(tokens).transpose(1, 2).reshape(b, c, hh, ww)) * SKIP_SCALE
        return x


class UNet(nn.Module):
    """Encoder/decoder over len(channels) resolutions (halved at each level), ``num_blocks`` residual
    blocks per encoder level and ``num_blocks + 1`` per decoder level fed by concatenated skips,
    self-attention where the feature map side is in ``attn_resolutions``.

    forward(x, noise_label, r_label=None, class_labels=None): ``noise_label`` is [B] (or a scalar),
    c_noise = ln σ/4 for EDM or t for flow matching; with ``use_r`` ``r_label`` is MeanFlow's r and
    the net embeds t and t − r (see :class:`ConditionEmbedding`). ``class_labels`` are int [B], the
    value ``num_classes`` being the null class.
    """

    def __init__(self, img_resolution: int = 16, in_channels: int = 1, out_channels: int | None = None,
                 channels=(16, 32, 64), num_blocks: int = 2, attn_resolutions=(4,), dropout: float = 0.0,
                 num_classes: int = 0, use_r: bool = False, emb_dim: int | None = None):
        super().__init__()
        channels = tuple(channels)
        levels = len(channels)
        resolutions = level_resolutions(img_resolution, levels, attn_resolutions)
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.use_r = use_r
        emb_dim = emb_dim or 4 * channels[0]

        self.embed = ConditionEmbedding(emb_dim, num_classes=num_classes, use_r=use_r)
        block = dict(emb_dim=emb_dim, dropout=dropout)

        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        c, skips = channels[0], [channels[0]]
        self.enc = nn.ModuleList()
        for i, (ch, res) in enumerate(zip(channels, resolutions)):
            if i > 0:
                self.enc.append(ResBlock(c, c, resample="down", **block))
                skips.append(c)
            for _ in range(num_blocks):
                self.enc.append(ResBlock(c, ch, attention=res in attn_resolutions, **block))
                c = ch
                skips.append(c)

        self.dec = nn.ModuleList()
        self.dec_takes_skip = []
        for i in reversed(range(levels)):
            res = resolutions[i]
            if i == levels - 1:
                self.dec.append(ResBlock(c, c, attention=res in attn_resolutions, **block))
                self.dec.append(ResBlock(c, c, **block))
                self.dec_takes_skip += [False, False]
            else:
                self.dec.append(ResBlock(c, c, resample="up", **block))
                self.dec_takes_skip.append(False)
            for _ in range(num_blocks + 1):
                self.dec.append(ResBlock(c + skips.pop(), channels[i], attention=res in attn_resolutions, **block))
                self.dec_takes_skip.append(True)
                c = channels[i]

        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, self.out_channels, 3, padding=1)

    def zero_r_branch(self) -> None:
        """Zero the r-embedding's last layer: a net loaded from use_r=False weights computes exactly them."""
        if self.embed.r_embed is None:
            raise ValueError("this network was built with use_r=False: it has no r-embedding")
        with torch.no_grad():
            self.embed.r_embed.mlp[-1].weight.zero_()
            self.embed.r_embed.mlp[-1].bias.zero_()

    def forward(self, x: torch.Tensor, noise_label, r_label=None, class_labels=None) -> torch.Tensor:
        noise_label, r_label = network_inputs(x, self.in_channels, self.img_resolution, noise_label, r_label)
        emb = F.silu(self.embed(noise_label, r_label, class_labels))

        h = self.conv_in(x)
        skips = [h]
        for blk in self.enc:
            h = blk(h, emb)
            skips.append(h)
        for blk, takes_skip in zip(self.dec, self.dec_takes_skip):
            if takes_skip:
                h = torch.cat([h, skips.pop()], dim=1)
            h = blk(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))
