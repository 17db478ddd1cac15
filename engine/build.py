"""Build the objects a run needs from its Config: the raw network, its parameterisation wrapper, and its
starting weights when a stage initialises from an exported run (:func:`load_export` + :func:`transfer_weights`).
"""
from __future__ import annotations

import dataclasses
import sys

import torch

from engine.config import Config, ConfigError
from engine.export import load_exported
from engine.networks import build_network
from engine.networks.edm2 import EDM2_SIZES, EDM2UNet
from engine.networks.layers import ConditionEmbedding
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
    if net_cfg.arch == "edm2":
        e = net_cfg.edm2
        try:
            return EDM2UNet(model_channels=edm2_channels(cfg), channel_mult=tuple(e.channel_mult),
                            num_blocks=e.num_blocks, attn_resolutions=tuple(e.attn_resolutions), **common)
        except ValueError as exc:
            raise ConfigError(f"network.edm2: {exc}") from None
    d = net_cfg.dit
    return build_network("dit", patch_size=d.patch_size, hidden_size=d.hidden_size, depth=d.depth,
                         num_heads=d.num_heads, mlp_ratio=d.mlp_ratio, **common)


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


# --------------------------------------------------------------------------------------------------
# Starting from an exported run's weights (mid.init=teacher, post.init=mid/teacher)
# --------------------------------------------------------------------------------------------------
def load_export(path, config_key: str) -> tuple[Config, torch.nn.Module, dict]:
    """engine.export.load_exported(path): (config, raw network, meta), its errors naming `config_key`."""
    try:
        return load_exported(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{config_key}='{path}': {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{config_key}='{path}': {exc}") from None


def arch_signature(cfg: Config) -> dict:
    """What fixes a raw network's parameter shapes, apart from use_r (handled by transfer_weights)."""
    n = cfg.network
    sub = getattr(n, n.arch)
    if n.arch == "edm2":   # a size preset and its channel count are the same architecture
        sub = dataclasses.replace(sub, size=None, model_channels=edm2_channels(cfg))
    return {"network.arch": n.arch, f"network.{n.arch}": sub, "network.num_classes": n.num_classes,
            "data.resolution": cfg.data.resolution, "data.channels": cfg.data.channels}


def transfer_weights(net: torch.nn.Module, cfg: Config, src_cfg: Config, src_net: torch.nn.Module, *,
                     config_key: str, path, hint: str = "") -> dict:
    """Copy the exported `src_net` (built from `src_cfg`, loaded from `path` = cfg's `config_key`) into `net`.

    Strict (every key, every shape), with one exception: a use_r=True `net` from a use_r=False source (a
    MeanFlow student from a flow-matching teacher) leaves the r-embedding's keys (``*.r_embed.*``) at their
    seeded init and zeroes the last layer of each r-embedding MLP, so the student starts as exactly the
    source: u(z, r, t) = v(z, t) for every r. Returns ``{"from": path, "left_at_init": [those keys]}``.
    `hint` is appended to the errors (e.g. "or set mid.init=random").
    """
    where, hint = f"{config_key}='{path}'", f"; {hint}" if hint else ""
    want, have = arch_signature(cfg), arch_signature(src_cfg)
    diff = [f"{k}: {have[k]} (export) vs {want[k]} (this run)" for k in want if want[k] != have[k]]
    if diff:
        raise ConfigError(f"{where} holds a different architecture ({'; '.join(diff)}): use the network.* and "
                          f"data.* settings of the run you initialise from{hint}")
    src_use_r, use_r = src_cfg.network.use_r, cfg.network.use_r
    if src_use_r and not use_r:
        raise ConfigError(f"{where} was trained with network.use_r=true; this run has network.use_r=false, "
                          f"which would drop its r-embedding: set network.use_r=true{hint}")
    try:
        missing, unexpected = net.load_state_dict(src_net.state_dict(), strict=False)
    except RuntimeError as exc:   # shape mismatches, which the signature should already have caught
        detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:3])
        raise ConfigError(f"{where} does not match this network ({detail}){hint}") from None
    allowed = [k for k in missing if ".r_embed." in f".{k}"] if use_r and not src_use_r else []
    bad = [k for k in missing if k not in allowed]
    if bad or unexpected:
        raise ConfigError(f"{where} does not match this network: missing keys {bad[:5]}, unexpected keys "
                          f"{unexpected[:5]}{hint}")
    if allowed:
        # A zero last layer makes the r-embedding add nothing: the student starts as the source network.
        for m in net.modules():
            if isinstance(m, ConditionEmbedding) and m.r_embed is not None:
                torch.nn.init.zeros_(m.r_embed.mlp[-1].weight)
                torch.nn.init.zeros_(m.r_embed.mlp[-1].bias)
        print(f"{config_key}: initialised from '{path}' (use_r=false); {len(allowed)} r-embedding tensors left "
              "at init, its last layer zeroed so u(z, r, t) = v(z, t) at the start", file=sys.stderr)
    return {"from": str(path), "left_at_init": allowed}
