"""Build a network from its Config: the raw network F and its parameterisation wrapper for a model kind."""
from __future__ import annotations

import dataclasses

import torch

from engine.config import Config
from engine.errors import ConfigError
from engine.models.adm import DhariwalUNet
from engine.models.dit import DiT
from engine.models.edm2 import EDM2_SIZES, EDM2UNet
from engine.models.precond import (ConsistencyFunction, DiscreteVPDenoiser, EDMDenoiser, FlowVelocity,
                                   MeanFlowModel, SiTMeanFlowModel, SiTVelocity)
from engine.models.song_unet import SongUNet
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
                      attn_resolutions=tuple(e.attn_resolutions), channels_per_head=e.channels_per_head, **common)
    if net_cfg.arch in ("songunet", "adm"):
        # EDM's names: label_dim for the class count; labels are dropped by the stages, not the network.
        common["label_dim"] = common.pop("num_classes")
        if net_cfg.arch == "adm":
            a = net_cfg.adm
            return _built(DhariwalUNet, "network.adm", model_channels=a.model_channels,
                          channel_mult=tuple(a.channel_mult), channel_mult_emb=a.channel_mult_emb,
                          num_blocks=a.num_blocks, attn_resolutions=tuple(a.attn_resolutions),
                          augment_dim=a.augment_dim, **common)
        s = net_cfg.songunet
        return _built(SongUNet, "network.songunet", model_channels=s.model_channels,
                      channel_mult=tuple(s.channel_mult), channel_mult_emb=s.channel_mult_emb, num_blocks=s.num_blocks,
                      attn_resolutions=tuple(s.attn_resolutions), augment_dim=s.augment_dim,
                      embedding_type=s.embedding_type, channel_mult_noise=s.channel_mult_noise,
                      encoder_type=s.encoder_type, decoder_type=s.decoder_type,
                      resample_filter=tuple(s.resample_filter), **common)
    d = net_cfg.dit
    return _built(DiT, "network.dit", patch_size=d.patch_size, hidden_size=d.hidden_size, depth=d.depth,
                  num_heads=d.num_heads, mlp_ratio=d.mlp_ratio, learn_sigma=d.learn_sigma, **common)


def _built(cls: type, key: str, **kwargs) -> torch.nn.Module:
    """cls(**kwargs), a geometry it cannot build being a one-line ConfigError naming the config section."""
    try:
        return cls(**kwargs)
    except (ValueError, NotImplementedError) as exc:
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


# What each model.convention can compute: kind -> wrapper (docs/teachers.md).
_WRAPPERS = {
    "native": {"edm": EDMDenoiser, "flow": FlowVelocity, "consistency": ConsistencyFunction,
               "meanflow": MeanFlowModel},
    "ddpm_eps": {"edm": DiscreteVPDenoiser},
    "sit_velocity": {"flow": SiTVelocity, "meanflow": SiTMeanFlowModel},
}


def wrap_network(net: torch.nn.Module, cfg: Config, kind: str) -> torch.nn.Module:
    """The parameterisation wrapper for `kind` (see model_kind) around a raw network, in the time and output
    convention of cfg.model.convention (a released DiT or SiT keeps its own clock; converted at call time)."""
    convention = cfg.model.convention
    wrapper = _WRAPPERS[convention].get(kind)
    if wrapper is None:
        can = " or ".join(_WRAPPERS[convention])
        raise ConfigError(f"model.convention={convention} networks compute a {can} model, not a '{kind}' one: "
                          "train this stage's network with model.convention=native (e.g. mid.init=random)")
    if wrapper in (EDMDenoiser,):
        return wrapper(net, sigma_data=cfg.model.sigma_data)
    if wrapper is ConsistencyFunction:
        m = cfg.model
        return wrapper(net, sigma_data=m.sigma_data, sigma_min=m.sigma_min, train_coeffs=m.train_coeffs,
                       eval_sigma_min=m.eval_sigma_min)
    return wrapper(net)


def arch_signature(cfg: Config) -> dict:
    """What fixes a raw network's parameter shapes and what its outputs mean, apart from use_r (handled by
    weights.transfer_weights)."""
    n = cfg.network
    sub = getattr(n, n.arch)
    if n.arch == "edm2":   # a size preset and its channel count are the same architecture
        sub = dataclasses.replace(sub, size=None, model_channels=edm2_channels(cfg))
    # model.convention too: the same weights in another clock compute something else (a SiT in the EDM clock)
    return {"network.arch": n.arch, f"network.{n.arch}": sub, "network.num_classes": n.num_classes,
            "data.resolution": cfg.data.resolution, "data.channels": cfg.data.channels,
            "model.convention": cfg.model.convention}
