"""Build a network from its Config: the raw network F and its parameterisation wrapper for a model kind."""
from __future__ import annotations

import dataclasses

import torch

from engine.config import Config
from engine.errors import ConfigError
from engine.models.dit import DiT
from engine.models.edm2 import EDM2_SIZES, EDM2UNet
from engine.models.precond import ConsistencyFunction, EDMDenoiser, FlowVelocity, MeanFlowModel
from engine.models.unet import UNet


def build_raw_network(cfg: Config) -> torch.nn.Module:
    """The raw network F, sized from cfg.network and the data's resolution and channels."""
    net_cfg = cfg.network
    common = dict(
        img_resolution=cfg.data.resolution,
        in_channels=cfg.data.channels,
        out_channels=cfg.data.channels,
        dropout=net_cfg.dropout,
        num_classes=net_cfg.num_classes,
        use_r=net_cfg.use_r,
    )
    if net_cfg.arch == "unet":
        u = net_cfg.unet
        return _built(UNet, "network.unet", channels=tuple(u.channels), num_blocks=u.num_blocks,
                      attn_resolutions=tuple(u.attn_resolutions), **common)
    if net_cfg.arch == "edm2":
        e = net_cfg.edm2
        return _built(EDM2UNet, "network.edm2", model_channels=edm2_channels(cfg),
                      channel_mult=tuple(e.channel_mult), num_blocks=e.num_blocks,
                      attn_resolutions=tuple(e.attn_resolutions), **common)
    d = net_cfg.dit
    return _built(DiT, "network.dit", patch_size=d.patch_size, hidden_size=d.hidden_size, depth=d.depth,
                  num_heads=d.num_heads, mlp_ratio=d.mlp_ratio, **common)


def _built(cls: type, key: str, **kwargs) -> torch.nn.Module:
    """cls(**kwargs), a geometry it cannot build being a one-line ConfigError naming the config section."""
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def edm2_channels(cfg: Config) -> int:
    """network.edm2's model channels: the size preset's (EDM2 Table 2) or model_channels, exactly one given."""
    e = cfg.network.edm2
    if (e.size is None) == (e.model_channels is None):
        raise ConfigError("set exactly one of network.edm2.size (xs, s, m, l, xl, xxl) and network.edm2.model_channels "
                          f"(got size={e.size!r}, model_channels={e.model_channels!r})")
    return EDM2_SIZES[e.size] if e.size is not None else e.model_channels


def model_kind(cfg: Config, stage: str) -> str:
    """What a stage's network computes: 'edm' / 'flow' (teachers), 'consistency' or 'meanflow' (flow maps)."""
    if stage == "pre":
        return cfg.model.kind
    if stage == "mid":
        return "consistency" if cfg.mid.form == "consistency" else "meanflow"
    return "meanflow" if cfg.post.method == "meanflow" else "consistency"


def wrap_network(net: torch.nn.Module, cfg: Config, kind: str) -> torch.nn.Module:
    """The parameterisation wrapper for `kind` (see model_kind) around a raw network."""
    if kind == "edm":
        return EDMDenoiser(net, sigma_data=cfg.model.sigma_data)
    if kind == "flow":
        return FlowVelocity(net)
    if kind == "consistency":
        return ConsistencyFunction(net, sigma_data=cfg.model.sigma_data, sigma_min=cfg.model.sigma_min)
    if kind == "meanflow":
        return MeanFlowModel(net)
    raise ValueError(f"unknown model kind '{kind}'")


def arch_signature(cfg: Config) -> dict:
    """What fixes a raw network's parameter shapes, apart from use_r (handled by weights.transfer_weights)."""
    n = cfg.network
    sub = getattr(n, n.arch)
    if n.arch == "edm2":   # a size preset and its channel count are the same architecture
        sub = dataclasses.replace(sub, size=None, model_channels=edm2_channels(cfg))
    return {"network.arch": n.arch, f"network.{n.arch}": sub, "network.num_classes": n.num_classes,
            "data.resolution": cfg.data.resolution, "data.channels": cfg.data.channels}
