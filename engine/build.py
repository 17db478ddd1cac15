"""Build the objects a run needs from its Config: the raw network and its parameterisation wrapper."""
from __future__ import annotations

import torch

from engine.config import Config
from engine.networks import build_network
from engine.networks.precond import ConsistencyFunction, EDMDenoiser, FlowVelocity, MeanFlowModel


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
        return build_network("unet", channels=tuple(u.channels), num_blocks=u.num_blocks,
                             attn_resolutions=tuple(u.attn_resolutions), **common)
    d = net_cfg.dit
    return build_network("dit", patch_size=d.patch_size, hidden_size=d.hidden_size, depth=d.depth,
                         num_heads=d.num_heads, mlp_ratio=d.mlp_ratio, **common)


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
