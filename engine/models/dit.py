"""A small DiT/SiT: patch tokens, fixed 2-D sin-cos positions, adaLN-Zero transformer blocks."""

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.layers import ConditionEmbedding, SelfAttention, network_inputs


def sincos_pos_embed_2d(grid: int, dim: int) -> torch.Tensor:
    """[grid², dim] fixed positions: half of the channels encode the row, half the column, each as
    sin/cos at dim/4 geometric frequencies (1 down to 1/10000)."""
    if dim % 4:
        raise ValueError(f"hidden_size {dim} must be divisible by 4 for 2-D sin-cos positions")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def enc(p):
        a = p.reshape(-1, 1) * omega
        return torch.cat([a.sin(), a.cos()], dim=1)

    return torch.cat([enc(rows), enc(cols)], dim=1).float()


def _modulate(x, shift, scale):
    return torch.addcmul(shift, x, scale + 1)


class DiTBlock(nn.Module):
    """Pre-LN attention + MLP whose LayerNorm shift/scale and residual gates come from the condition;
    the gates are zero-initialised so each block starts as the identity (adaLN-Zero)."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        mlp_hidden = int(hidden * mlp_ratio)
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden, num_heads, zero_init=False)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"),
                                 nn.Dropout(dropout), nn.Linear(mlp_hidden, hidden))
        self.ada = nn.Linear(hidden, 6 * hidden)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(_modulate(self.norm1(x), shift1, scale1))
        return x + gate2 * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """Diffusion transformer on (img_resolution/patch_size)² tokens.

    Same forward contract as :class:`engine.models.unet.UNet`:
    forward(x, noise_label, r_label=None, class_labels=None) -> tensor shaped like x (with
    out_channels). Dropout acts on the MLP hidden layer. Attention goes through
    :class:`engine.models.layers.SelfAttention` (swappable ``attn_fn``).
    """

    def __init__(self, img_resolution: int = 16, in_channels: int = 1, out_channels: int | None = None,
                 patch_size: int = 2, hidden_size: int = 128, depth: int = 4, num_heads: int = 4,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, num_classes: int = 0, use_r: bool = False):
        super().__init__()
        if img_resolution % patch_size:
            raise ValueError(f"img_resolution {img_resolution} is not divisible by patch_size {patch_size}")
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.patch_size = patch_size
        self.use_r = use_r
        self.grid = img_resolution // patch_size

        self.patch = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.register_buffer("pos", sincos_pos_embed_2d(self.grid, hidden_size)[None], persistent=False)
        self.embed = ConditionEmbedding(hidden_size, num_classes=num_classes, use_r=use_r)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(hidden_size, 2 * hidden_size)
        self.out = nn.Linear(hidden_size, patch_size ** 2 * self.out_channels)
        for layer in (self.ada_out, self.out):  # the net starts by predicting zero
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, noise_label, r_label=None, class_labels=None) -> torch.Tensor:
        noise_label, r_label = network_inputs(x, self.in_channels, self.img_resolution, noise_label, r_label)
        c = F.silu(self.embed(noise_label, r_label, class_labels))

        h = self.patch(x).flatten(2).transpose(1, 2) + self.pos.to(x.dtype)
        for blk in self.blocks:
            h = blk(h, c)
        shift, scale = self.ada_out(c)[:, None].chunk(2, dim=-1)
        h = self.out(_modulate(self.norm_out(h), shift, scale))
        b, g, p, co = x.shape[0], self.grid, self.patch_size, self.out_channels
        return h.reshape(b, g, g, p, p, co).permute(0, 5, 1, 3, 2, 4).reshape(b, co, g * p, g * p)
