"""DiT (Peebles & Xie 2023), which is also SiT's backbone (Ma et al. 2024), plus MeanFlow's second time input.

State-dict names and shapes are those of the released DiT-XL/2 and SiT-XL/2 checkpoints, so their files load
as they are; the forward computes what the original networks compute (tests/models/test_dit_official.py
checks both against fixtures made with the original code). The time input is embedded unscaled: DiT's DDPM
timestep 0..999, SiT's and the engine's flow time t in [0, 1].
"""

import math

import torch
from torch import nn

from engine.models.layers import SelfAttention, network_inputs

FREQUENCY_DIM = 256   # sinusoidal features fed to each time embedder's MLP


def timestep_features(t: torch.Tensor, dim: int = FREQUENCY_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(t·f), sin(t·f)] with f_i = max_period^(-i/(dim/2)), the frequencies computed in float32 and the
    product in t's precision (at least float32): DiT's float32 formula for a float32 (or integer) t, while a
    float64 t keeps float64 resolution (MeanFlow's jvp checked against finite differences in float64)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    dtype = torch.promote_types(t.dtype, torch.float32)
    args = t.to(dtype)[:, None] * freqs.to(dtype)[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """[grid², dim] fixed positions of the row-major patch tokens: the first half of the channels encodes the
    column, the second half the row, each as [sin, cos] of pos·ω, ω_i = 1/10000^(i/(dim/4)) (float64)."""
    if dim % 4:
        raise ValueError(f"hidden_size {dim} must be divisible by 4 for 2-D sin-cos positions")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def encode(p):
        angles = p.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches to tokens [B, (H/p)·(W/p), hidden], row-major."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """A [B] time to [B, hidden]: 256 sinusoidal features, then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_DIM, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class index to [B, hidden]; row ``num_classes`` is the null class (classifier-free guidance)."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class Mlp(nn.Module):
    """fc1 - GELU(tanh) - dropout - fc2; dropout acts on the hidden layer only."""

    def __init__(self, hidden_size: int, mlp_hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class DiTBlock(nn.Module):
    """Pre-LN attention + MLP whose LayerNorm shift/scale and residual gates come from the condition (adaLN);
    the modulation layer starts at zero, so each block starts as the identity (adaLN-Zero)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads, zero_init=False)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map of each token to its patch's p·p·channels values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion transformer on (img_resolution/patch_size)² tokens; the condition is the sum of the time,
    (use_r) t − r and class embeddings.

    forward(x, noise_label, r_label=None, class_labels=None) -> [B, C, H, W] with C = out_channels, or
    2·out_channels with ``learn_sigma`` (all returned; DiT's second half is its variance interpolation,
    SiT's is unused). ``class_labels`` None means the null class ``num_classes``. Attention goes through
    :class:`engine.models.layers.SelfAttention` (swappable ``attn_fn``).
    """

    def __init__(self, img_resolution: int = 16, in_channels: int = 1, out_channels: int | None = None,
                 patch_size: int = 2, hidden_size: int = 128, depth: int = 4, num_heads: int = 4,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, num_classes: int = 0, use_r: bool = False,
                 learn_sigma: bool = False):
        super().__init__()
        if img_resolution % patch_size:
            raise ValueError(f"img_resolution {img_resolution} is not divisible by patch_size {patch_size}")
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.learn_sigma = learn_sigma
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.use_r = use_r
        self.grid = img_resolution // patch_size

        # A buffer, not a frozen parameter: saved under the original's key, never handed to an optimizer.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid)[None])
        self.x_embedder = PatchEmbed(in_channels, hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.r_embedder = TimestepEmbedder(hidden_size) if use_r else None
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes else None
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, dropout) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels * (2 if learn_sigma else 1))
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linear and patch weights, zero biases, N(0, 0.02) embedders,
        zero modulation and output layers (the net starts by predicting zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        for embedder in (self.t_embedder, self.r_embedder):
            if embedder is not None:
                nn.init.normal_(embedder.mlp[0].weight, std=0.02)
                nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for ada in [blk.adaLN_modulation[-1] for blk in self.blocks] + [self.final_layer.adaLN_modulation[-1]]:
            nn.init.zeros_(ada.weight)
            nn.init.zeros_(ada.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def zero_r_branch(self) -> None:
        """Zero the r-embedder's last layer: the t − r embedding adds nothing, so a net loaded from weights
        without it (DiT, SiT, a flow teacher) computes exactly that network, u(z, r, t) = v(z, t) for any r."""
        if self.r_embedder is None:
            raise ValueError("this network was built with use_r=False: it has no r-embedder")
        with torch.no_grad():
            self.r_embedder.mlp[-1].weight.zero_()
            self.r_embedder.mlp[-1].bias.zero_()

    def condition(self, noise_label: torch.Tensor, r_label, class_labels) -> torch.Tensor:
        """[B, hidden]: the sum of the embeddings of t, of t − r (use_r) and of the class (None = null)."""
        c = self.t_embedder(noise_label)
        if self.use_r:
            if r_label is None:
                raise ValueError("this network was built with use_r=True: pass r_label")
            c = c + self.r_embedder(noise_label - r_label)
        elif r_label is not None:
            raise ValueError("r_label given but the network was built with use_r=False")
        if self.y_embedder is not None:
            if class_labels is None:
                class_labels = torch.full((c.shape[0],), self.num_classes, device=c.device, dtype=torch.long)
            c = c + self.y_embedder(class_labels)
        elif class_labels is not None:
            raise ValueError("class_labels given but the network was built with num_classes=0")
        return c

    def forward(self, x: torch.Tensor, noise_label, r_label=None, class_labels=None) -> torch.Tensor:
        noise_label, r_label = network_inputs(x, self.in_channels, self.img_resolution, noise_label, r_label)
        c = self.condition(noise_label, r_label, class_labels)
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        for blk in self.blocks:
            h = blk(h, c)
        h = self.final_layer(h, c)
        b, g, p, co = x.shape[0], self.grid, self.patch_size, h.shape[-1] // self.patch_size ** 2
        return h.reshape(b, g, g, p, p, co).permute(0, 5, 1, 3, 2, 4).reshape(b, co, g * p, g * p)
