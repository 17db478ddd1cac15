"""Network weights in and out: exports (EMA weights as safetensors beside the config that built them),
initialising one network from another's export, and importing published state dicts.

An export directory holds `network.safetensors`, `config.yaml` and `meta.json`; it is all that sampling,
evaluation and a later stage (a teacher, or an initialisation) need.

Imported files are state dicts: `.safetensors`, or `.pt`/`.pth` read with ``torch.load(weights_only=True)``
(a pickled module is refused: convert it where its code lives, e.g. ``torch.save(net.state_dict(), "x.pt")``).
A dict that wraps the weights under one of ``ema``, ``state_dict``, ``model``, ``net`` is unwrapped. Key
prefixes added by wrappers (``unet.``, ``module.``, ``net.`` ...) are found automatically (the one that
matches most keys) or given explicitly. Strict where it matters: a network key missing from the file or a
tensor of the wrong shape is an error listing the keys; file keys the network does not have (e.g. EDM2's
loss-weighting ``logvar_*`` head) are ignored and listed.
"""
from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engine.config import Config, load_config, read_saved_config, save_config
from engine.errors import ConfigError, DataError, MissingFileError
from engine.files import write_atomically, write_text_atomically
from engine.models.factory import arch_signature, build_raw_network
from engine.models.layers import ConditionEmbedding


def export_network(net: torch.nn.Module, cfg: Config, out_dir: str | Path, meta: dict | None = None) -> Path:
    """Write the raw network's weights, its config and `meta`, each file replaced atomically."""
    out_dir = Path(out_dir)
    state = {k: v.detach().float().contiguous().cpu() for k, v in net.state_dict().items()}
    write_atomically(out_dir / "network.safetensors", lambda tmp: save_file(state, str(tmp)))
    save_config(cfg, out_dir / "config.yaml")
    write_text_atomically(out_dir / "meta.json", json.dumps(meta or {}, indent=2))
    return out_dir


def resolve_export_dir(path: str | Path) -> Path:
    """Accept a run dir or its export dir; fail with what to do when there are no weights yet."""
    path = Path(path)
    for cand in (path / "export", path):
        if (cand / "network.safetensors").is_file():
            return cand
    if not path.exists():
        raise MissingFileError(f"'{path}' does not exist: pass the --run-dir of a training run")
    raise MissingFileError(f"no exported weights in '{path}' (expected export/network.safetensors): "
                           "train first, or wait for the first checkpoint")


def load_exported(path: str | Path, config_key: str | None = None,
                  device: str | torch.device = "cpu") -> tuple[Config, torch.nn.Module, dict]:
    """(config, raw network with the exported EMA weights, meta) from a run or export dir.

    ``config_key`` (e.g. ``mid.teacher``) names the setting the path came from in the errors."""
    where = f"{config_key}='{path}': " if config_key else ""
    try:
        export_dir = resolve_export_dir(path)
    except MissingFileError as exc:
        raise MissingFileError(f"{where}{exc}") from None
    if not (export_dir / "config.yaml").is_file():
        raise MissingFileError(f"{where}'{export_dir}' has network.safetensors but no config.yaml (the config "
                               "that built the network): copy it from the run dir, or re-export")
    try:
        cfg = read_saved_config(export_dir / "config.yaml")
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None
    net = build_raw_network(cfg)
    try:
        state = load_file(str(export_dir / "network.safetensors"))
    except Exception as exc:  # safetensors raises several types for a truncated or foreign file
        raise DataError(f"{where}'{export_dir / 'network.safetensors'}' is not a readable safetensors file "
                        f"({exc}): re-export it from the run's checkpoints") from None
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:   # shapes that do not fit the config
        detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:3])
        raise ConfigError(f"{where}'{export_dir}/network.safetensors' does not fit its config.yaml ({detail}): "
                          "the two come from different runs; re-export them together") from None
    if missing or unexpected:
        raise ConfigError(f"{where}'{export_dir}' does not match its config: missing keys {missing[:5]}, "
                          f"unexpected keys {unexpected[:5]}")
    meta = json.loads((export_dir / "meta.json").read_text()) if (export_dir / "meta.json").is_file() else {}
    return cfg, net.to(device).eval(), meta


# --------------------------------------------------------------------------------------------------
# Starting from an exported run's weights (mid.init=teacher, post.init=mid/teacher)
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# Importing published weights
# --------------------------------------------------------------------------------------------------
WRAPPER_KEYS = ("ema", "state_dict", "model", "net")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors by name from a .safetensors / .pt / .pth file; a one-line DataError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"--weights '{path}' does not exist: pass a .safetensors, .pt or .pth state dict")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        reason = "it holds pickled objects, not only tensors" if isinstance(exc, pickle.UnpicklingError) \
            else str(exc).strip().splitlines()[0]
        raise DataError(f"'{path}' is not a readable state dict ({reason}): save net.state_dict() with "
                        "torch.save or safetensors") from None
    if isinstance(state, dict) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        inner = [k for k in WRAPPER_KEYS if isinstance(state.get(k), dict)]
        if inner:
            state = state[inner[0]]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"'{path}' is not a flat state dict of tensors (nor wraps one under "
                        f"{', '.join(WRAPPER_KEYS)}): save net.state_dict()")
    return state


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


def import_weights(config_path, weights, out_dir, *, overrides=(), prefix: str | None = None,
                   stage: str = "pre") -> dict:
    """Load `weights` into the network of `config_path` and export it to ``out_dir/export``; returns the report.
    Raises ConfigError (listing the keys) when a network key is missing or a shape differs."""
    cfg = load_config(config_path, list(overrides))
    net = build_raw_network(cfg)
    result = match_state_dict(net, read_state_dict(weights), prefix)
    report = {"weights": str(weights), "config": str(config_path), "prefix": result["prefix"],
              "loaded": len(result["matched"]), "missing": result["missing"], "unexpected": result["unexpected"],
              "mismatched": result["mismatched"]}
    if result["missing"] or result["mismatched"]:
        shapes = "; ".join(f"{k}: file {a} vs network {b}" for k, a, b in result["mismatched"][:5])
        raise ConfigError(f"'{weights}' does not fit the network of '{config_path}' (prefix '{result['prefix']}'): "
                          f"{len(result['missing'])} missing keys {result['missing'][:5]}"
                          f"{f', shape mismatches {shapes}' if shapes else ''}: check network.* / data.* "
                          "against the weights, or pass --strip-prefix")
    net.load_state_dict({k: v.float() for k, v in result["matched"].items()})
    out_dir = Path(out_dir)
    export_network(net, cfg, out_dir / "export", meta={"stage": stage, "imported_from": str(weights),
                                                       "ignored_keys": result["unexpected"]})
    (out_dir / "import_report.json").write_text(json.dumps(report, indent=2))
    return report
