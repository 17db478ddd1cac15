"""Network weights in and out: exports (EMA weights as safetensors beside the config that built them) and
initialising one network from another's export (released files come in through engine/models/importer.py).

An export directory holds `network.safetensors`, `config.yaml` and `meta.json`; it is all that sampling,
evaluation and a later stage (a teacher, or an initialisation) need.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.config import Config, read_saved_config, save_config
from engine.errors import ConfigError, DataError, MissingFileError
from engine.files import write_atomically, write_text_atomically
from engine.models.factory import arch_signature, build_raw_network


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
R_BRANCH_NAMES = {"r_embed", "r_embedder"}   # the modules of MeanFlow's r input, in every network


def transfer_weights(net: torch.nn.Module, cfg: Config, src_cfg: Config, src_net: torch.nn.Module, *,
                     config_key: str, path, hint: str = "") -> dict:
    """Copy the exported `src_net` (built from `src_cfg`, loaded from `path` = cfg's `config_key`) into `net`.

    Strict (every key, every shape), with one exception: a use_r=True `net` from a use_r=False source (a
    MeanFlow student from a flow-matching teacher) leaves the r-embedding's keys (``*.r_embed.*``,
    ``r_embedder.*``) at their seeded init and zeroes the branch's last layer (``net.zero_r_branch()``), so the
    student starts as exactly the source: u(z, r, t) = v(z, t) for every r. Returns
    ``{"from": path, "left_at_init": [those keys]}``.
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
    allowed = [k for k in missing if R_BRANCH_NAMES & set(k.split("."))] if use_r and not src_use_r else []
    bad = [k for k in missing if k not in allowed]
    if bad or unexpected:
        raise ConfigError(f"{where} does not match this network: missing keys {bad[:5]}, unexpected keys "
                          f"{unexpected[:5]}{hint}")
    if allowed:
        net.zero_r_branch()   # the r-embedding adds nothing: the student starts as the source network
        print(f"{config_key}: initialised from '{path}' (use_r=false); {len(allowed)} r-embedding tensors left "
              "at init, its last layer zeroed so u(z, r, t) = v(z, t) at the start", file=sys.stderr)
    return {"from": str(path), "left_at_init": allowed}
