"""Released weights in: a downloaded EDM / EDM2 snapshot, DiT / SiT checkpoint or state dict becomes an export
dir (``RUN/export``) that works as ``mid.teacher`` with no further step (docs/teachers.md).

- The architecture comes from the file when it says it (a snapshot's constructor arguments, read by
  :mod:`engine.models.released` without running its code); otherwise from ``--config`` (configs/teachers/
  holds one per released file). When both are given they must agree.
- Keys are matched strictly: every network key present with its shape. File keys the network lacks (EDM2's
  loss-weighting ``logvar_*`` head) are listed in the report and the meta. The wrapper's key prefix
  (``model.`` for EDMPrecond, ``unet.`` for EDM2's Precond) is known for snapshots, found otherwise.
- Weights are exported in float32: float16 files (EDM2's) are upcast exactly, nothing is re-quantised.
- The network keeps its own clock; ``model.convention`` (in the export's config and meta) says how the
  wrappers convert it (engine/models/precond.py): EDM's σ-parameterisation as is, DiT's ε on the discrete
  VP schedule as a denoiser D(x, σ), SiT's velocity with its time flipped.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch

from engine.config import Config, load_config
from engine.errors import ConfigError, DataError, MissingFileError
from engine.files import write_text_atomically
from engine.models.adm import DhariwalUNet
from engine.models.edm2 import EDM2UNet
from engine.models.factory import build_raw_network, edm2_channels
from engine.models.released import Released, read_released
from engine.models.song_unet import SongUNet
from engine.models.weights import export_network

# Snapshot wrapper class -> the prefix of its raw network's keys.
SNAPSHOT_PREFIX = {"EDMPrecond": "model.", "Precond": "unet."}
# Constructor arguments that do not change what the network computes in float32 (precision and the
# σ-range hints of the samplers; EDM2's uncertainty head, which is not imported).
_NOT_ARCHITECTURE = {"use_fp16", "sigma_min", "sigma_max", "logvar_channels"}
_INTERFACE = {"img_resolution": "data.resolution", "img_channels": "data.channels", "label_dim": "network.num_classes",
              "sigma_data": "model.sigma_data", "dropout": "network.dropout", "label_dropout": "pre.label_dropout"}
_ARCH = {"SongUNet": ("songunet", SongUNet), "DhariwalUNet": ("adm", DhariwalUNet)}
_EDM2_KEYS = ["model_channels", "channel_mult", "num_blocks", "attn_resolutions", "channels_per_head"]


def _defaults(cls: type) -> dict[str, Any]:
    """A network class's constructor defaults, which are the original's: a snapshot omits what it left at them."""
    return {name: (list(p.default) if isinstance(p.default, tuple) else p.default)
            for name, p in inspect.signature(cls.__init__).parameters.items() if p.default is not p.empty}


def snapshot_settings(class_name: str, kwargs: dict) -> dict[str, Any]:
    """The config settings (dotted key -> value) of a snapshot's network, from its constructor arguments.
    An argument this engine has no setting for is a DataError: guessing it would import a different network."""
    kwargs = dict(kwargs)
    if class_name == "EDMPrecond":
        model_type = kwargs.pop("model_type", "DhariwalUNet")
        if model_type not in _ARCH:
            raise DataError(f"the snapshot's EDMPrecond wraps a {model_type}; this engine imports SongUNet and "
                            "DhariwalUNet (docs/teachers.md)")
        arch, cls = _ARCH[model_type]
        defaults = _defaults(cls)
        section = [k for k in defaults if k not in ("dropout", "label_dropout", "label_dim", "use_r")]
    elif class_name == "Precond":
        arch, defaults, section = "edm2", _defaults(EDM2UNet), _EDM2_KEYS
        for name in ("label_balance", "concat_balance"):
            if kwargs.pop(name, 0.5) != 0.5:
                raise DataError(f"the snapshot's EDM2 network has {name} != 0.5, which this engine does not build")
    else:
        raise DataError(f"the snapshot holds a {class_name}; this engine imports EDM's EDMPrecond and EDM2's Precond "
                        "snapshots (docs/teachers.md lists the released files)")
    if arch == "edm2" and "model_channels" not in kwargs:
        raise DataError("the snapshot's EDM2 network does not say its model_channels: pass --config with the "
                        "network's settings (configs/teachers/edm2-*.yaml)")
    settings: dict[str, Any] = {"network.arch": arch, "model.kind": "edm", "model.convention": "native",
                                "model.sigma_data": 0.5, "network.dropout": defaults.get("dropout", 0.0),
                                "pre.label_dropout": 0.0, "network.num_classes": 0}
    settings.update({f"network.{arch}.{k}": defaults[k] for k in section if k in defaults})
    if arch == "edm2":
        settings["network.edm2.size"] = None
    for name, value in kwargs.items():
        if name in _NOT_ARCHITECTURE:
            continue
        if name in _INTERFACE:
            settings[_INTERFACE[name]] = value
        elif name in section:
            settings[f"network.{arch}.{name}"] = value
        else:
            raise DataError(f"the snapshot's {class_name} was built with {name}={value!r}, which this engine has no "
                            "setting for: it cannot import this network")
    return settings


def _config_for(released: Released, weights: Path, config_path, overrides) -> tuple[Config, dict]:
    """The import's config and the settings the file itself gave ({} for files that say nothing)."""
    if released.format != "snapshot":
        if config_path is None:
            raise ConfigError(f"'{weights}' holds weights but not the network's settings ({released.format}): pass "
                              "--config with them, e.g. configs/teachers/DiT-XL-2-256x256.yaml (docs/teachers.md)")
        return load_config(config_path, list(overrides)), {}
    settings = snapshot_settings(released.class_name, released.init_kwargs)
    # The file is the truth about its network: neither --config nor --set may say otherwise.
    given = load_config(config_path, list(overrides))
    if config_path is None:
        given = load_config(None, [*(f"{k}={json.dumps(v)}" for k, v in settings.items()), *overrides])
    same_width = {"network.edm2.size", "network.edm2.model_channels"} if given.network.arch == "edm2" \
        and edm2_channels(given) == settings.get("network.edm2.model_channels") else set()
    diff = [f"{k}: file {v!r}, yours {_get(given, k)!r}" for k, v in settings.items()
            if _get(given, k) != v and k not in same_width]
    if diff:
        where = f"--config '{config_path}'" if config_path else "--set"
        raise ConfigError(f"'{weights}' was built with other settings than {where} gives ({'; '.join(diff[:4])}): "
                          "drop them, or use the file's configs/teachers/ config")
    cfg = load_config(config_path, [*(f"{k}={json.dumps(v)}" for k, v in settings.items()), *overrides])
    if cfg.name == "run":
        cfg.name = weights.stem
    return cfg, settings


def _get(cfg: Config, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def find_prefix(source_keys, target_keys) -> str:
    """The leading dotted prefix of the source keys (up to two levels, or none) that maps most keys onto
    the target's; ties go to the shortest."""
    target = set(target_keys)
    candidates = {""}
    for k in source_keys:
        parts = k.split(".")
        candidates.update(".".join(parts[:i]) + "." for i in (1, 2) if len(parts) > i)
    return max(sorted(candidates, key=len),
               key=lambda p: sum(k.startswith(p) and k[len(p):] in target for k in source_keys))


def match_state_dict(net: torch.nn.Module, state: dict[str, torch.Tensor], prefix: str | None = None) -> dict:
    """Compare `state` (after stripping `prefix`, found automatically when None) with `net`'s state dict.

    Returns ``{"prefix", "matched": {key: tensor}, "missing", "unexpected", "mismatched": [(key, file shape,
    net shape)]}``; nothing is loaded.
    """
    own = net.state_dict()
    prefix = find_prefix(state, own) if prefix is None else prefix
    renamed = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    # A published scalar gain (shape []) is stored here as shape [1]: DeepSpeed cannot broadcast 0-d params.
    renamed = {k: v.reshape(own[k].shape) if k in own and v.numel() == 1 and own[k].numel() == 1 else v
               for k, v in renamed.items()}
    unexpected = sorted([k for k in state if not k.startswith(prefix)] +
                        [prefix + k for k in renamed if k not in own])
    mismatched = [(k, list(renamed[k].shape), list(own[k].shape)) for k in own
                  if k in renamed and renamed[k].shape != own[k].shape]
    bad = {m[0] for m in mismatched}
    return {"prefix": prefix, "missing": sorted(k for k in own if k not in renamed), "unexpected": unexpected,
            "mismatched": mismatched, "matched": {k: renamed[k] for k in own if k in renamed and k not in bad}}


def _misfit(weights, where: str, result: dict, own: dict, state: dict) -> str:
    """One line: the first missing, unexpected and mis-shaped keys, each with its shape."""
    p = result["prefix"]
    parts = []
    if result["missing"]:
        keys = ", ".join(f"{k} {list(own[k].shape)}" for k in result["missing"][:3])
        parts.append(f"{len(result['missing'])} network keys missing from the file ({keys})")
    if result["unexpected"]:
        keys = ", ".join(f"{k} {list(state[k].shape)}" for k in result["unexpected"][:3])
        parts.append(f"{len(result['unexpected'])} file keys the network lacks ({keys})")
    if result["mismatched"]:
        keys = ", ".join(f"{k}: file {a} vs network {b}" for k, a, b in result["mismatched"][:3])
        parts.append(f"{len(result['mismatched'])} shapes differ ({keys})")
    return (f"'{weights}' does not fit the network of {where} (key prefix '{p}'): {'; '.join(parts)}: check "
            "network.* / data.* against the file (docs/teachers.md), or pass --strip-prefix")


def import_weights(weights, out_dir, *, config_path=None, overrides=(), prefix: str | None = None,
                   stage: str = "pre") -> dict:
    """Read `weights`, build its network, load it strictly and export it to ``out_dir/export``; returns the
    report (also written to ``out_dir/import_report.json``). Nothing is written when the file does not fit."""
    weights = Path(weights)
    if not weights.is_file():
        raise MissingFileError(f"--weights '{weights}' does not exist: pass the downloaded .pkl, .pt, .pth or "
                               ".safetensors file")
    released = read_released(weights)
    cfg, from_file = _config_for(released, weights, config_path, overrides)
    net = build_raw_network(cfg)
    if prefix is None and released.format == "snapshot":
        prefix = SNAPSHOT_PREFIX[released.class_name]
    state = released.state_dict
    result = match_state_dict(net, state, prefix)
    # Only the uncertainty head of EDM2 (and nothing else) may be left behind without being an error.
    extra = [k for k in result["unexpected"] if not k.startswith("logvar")]
    if result["missing"] or result["mismatched"] or extra:
        where = f"--config '{config_path}'" if config_path else "the snapshot's settings"
        raise ConfigError(_misfit(weights, where, {**result, "unexpected": extra}, net.state_dict(), state))
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in state.values()})
    net.load_state_dict({k: v.float() for k, v in result["matched"].items()})
    meta = {"stage": stage, "imported_from": str(weights), "format": released.format,
            "taken_from": released.taken_from, "class_name": released.class_name,
            "init_kwargs": released.init_kwargs, "settings_from_file": from_file,
            "convention": cfg.model.convention, "kind": cfg.model.kind, "stored_dtypes": dtypes,
            "ignored_keys": result["unexpected"]}
    out_dir = Path(out_dir)
    export_network(net, cfg, out_dir / "export", meta=meta)
    report = {"weights": str(weights), "config": None if config_path is None else str(config_path),
              "format": released.format, "prefix": result["prefix"], "loaded": len(result["matched"]),
              "ignored": result["unexpected"], "stored_dtypes": dtypes, "convention": cfg.model.convention}
    write_text_atomically(out_dir / "import_report.json", json.dumps(report, indent=2))
    return report
