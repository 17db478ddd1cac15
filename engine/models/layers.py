"""Building blocks shared by the U-Net and the DiT: label embeddings, self-attention, input checks.

Attention itself (SDPA, flash-attn or the JVP-capable Triton kernels) is chosen in ``kernels.attention``.
"""

import torch
from torch import nn

from engine.formulas.broadcast import per_sample
from kernels.attention import scaled_dot_product_attention


class SelfAttention(nn.Module):
    """Multi-head self-attention over tokens [B, N, C].

    ``attn_fn`` is the single call site of the attention kernel (``kernels.scaled_dot_product_attention``):
    assign another ``(q, k, v) -> out`` function to swap the implementation without touching weights.
    """

    def __init__(self, channels: int, num_heads: int, zero_init: bool = True):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        if zero_init:  # the block starts as identity
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        self.attn_fn = scaled_dot_product_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = self.attn_fn(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def fourier_features(label: torch.Tensor, dim: int, max_freq: float = 100.0) -> torch.Tensor:
    """[cos(f·label), sin(f·label)] with dim/2 frequencies log-spaced on [1, max_freq] rad per unit.

    Labels are O(1) (c_noise = ln σ/4 ∈ ~[−1.6, 1.1], or FM time t ∈ [0, 1]); this band resolves ~1%
    steps of the label yet keeps ∂/∂t of the embedding moderate for MeanFlow's JVP.
    """
    half = dim // 2
    dtype = torch.promote_types(label.dtype, torch.float32)
    exps = torch.arange(half, device=label.device, dtype=dtype) / max(half - 1, 1)
    args = label.to(dtype)[:, None] * max_freq ** exps
    return torch.cat([args.cos(), args.sin()], dim=1)


class LabelEmbedding(nn.Module):
    """Fourier features of a [B] time/noise label followed by a 2-layer SiLU MLP."""

    def __init__(self, emb_dim: int, feature_dim: int | None = None):
        super().__init__()
        self.feature_dim = feature_dim or emb_dim
        self.mlp = nn.Sequential(nn.Linear(self.feature_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, label: torch.Tensor) -> torch.Tensor:
        feats = fourier_features(label, self.feature_dim)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class ConditionEmbedding(nn.Module):
    """Sum of the embeddings of the noise label, of t − r (MeanFlow, ``use_r``) and of the class.

    With ``use_r`` the second input is the interval length t − r rather than r itself, so r = t
    (plain flow matching) always maps to the same embedding. Class index ``num_classes`` is the
    learned null class used for classifier-free-guidance dropout; ``None`` labels mean null.
    """

    def __init__(self, emb_dim: int, num_classes: int = 0, use_r: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.use_r = use_r
        self.t_embed = LabelEmbedding(emb_dim)
        self.r_embed = LabelEmbedding(emb_dim) if use_r else None
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None

    def forward(self, noise_label, r_label=None, class_labels=None) -> torch.Tensor:
        emb = self.t_embed(noise_label)
        if self.use_r:
            if r_label is None:
                raise ValueError("this network was built with use_r=True: pass r_label")
            emb = emb + self.r_embed(noise_label - r_label)
        elif r_label is not None:
            raise ValueError("r_label given but the network was built with use_r=False")
        if self.class_embed is not None:
            if class_labels is None:
                class_labels = torch.full((emb.shape[0],), self.num_classes, device=emb.device, dtype=torch.long)
            emb = emb + self.class_embed(class_labels)
        elif class_labels is not None:
            raise ValueError("class_labels given but the network was built with num_classes=0")
        return emb


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels."""
    return nn.GroupNorm(max(1, min(32, channels // 4)), channels, eps=1e-6)


def level_resolutions(img_resolution: int, levels: int, attn_resolutions=None) -> list[int]:
    """The side of each U-Net level, halving from img_resolution; ``attn_resolutions``, when given, must be
    among them (a ValueError naming both otherwise)."""
    if img_resolution % 2 ** (levels - 1):
        raise ValueError(f"img_resolution {img_resolution} is not divisible by 2^{levels - 1} "
                         f"(needed for {levels} levels)")
    resolutions = [img_resolution >> i for i in range(levels)]
    bad = set(attn_resolutions or ()) - set(resolutions)
    if bad:
        raise ValueError(f"attn_resolutions {sorted(bad)} not among the level resolutions {resolutions}")
    return resolutions


def network_inputs(x: torch.Tensor, in_channels: int, img_resolution: int, noise_label, r_label=None):
    """Check x's shape against the network's and broadcast the time labels to [B] (r_label may be None)."""
    if x.shape[1:] != (in_channels, img_resolution, img_resolution):
        raise ValueError(f"expected input [B, {in_channels}, {img_resolution}, {img_resolution}], "
                         f"got {tuple(x.shape)}")
    return per_sample(noise_label, x), None if r_label is None else per_sample(r_label, x)
