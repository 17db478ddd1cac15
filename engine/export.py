"""Exported networks: EMA weights as safetensors beside the config that built them.

An export directory holds `network.safetensors`, `config.yaml` and `meta.json`; it is all that
`engine.sample`, `engine.evaluate` and a later stage (a teacher, or an initialisation) need.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from engine.config import Config, from_dict, save_config


def export_network(net: torch.nn.Module, cfg: Config, out_dir: str | Path, meta: dict | None = None) -> Path:
    """Write the raw network's weights, its config and `meta`, each file replaced atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in net.state_dict().items()}
    tmp = out_dir / "network.safetensors.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, out_dir / "network.safetensors")
    save_config(cfg, out_dir / "config.yaml.tmp")
    os.replace(out_dir / "config.yaml.tmp", out_dir / "config.yaml")
    (out_dir / "meta.json.tmp").write_text(json.dumps(meta or {}, indent=2))
    os.replace(out_dir / "meta.json.tmp", out_dir / "meta.json")
    return out_dir


def resolve_export_dir(path: str | Path) -> Path:
    """Accept a run dir or its export dir; fail with what to do when there are no weights yet."""
    path = Path(path)
    for cand in (path / "export", path):
        if (cand / "network.safetensors").is_file():
            return cand
    if not path.exists():
        raise FileNotFoundError(f"'{path}' does not exist: pass the --run-dir of a training run")
    raise FileNotFoundError(f"no exported weights in '{path}' (expected export/network.safetensors): "
                            "train first, or wait for the first checkpoint")


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> tuple[Config, torch.nn.Module, dict]:
    """(config, raw network with the exported EMA weights, meta) from a run or export dir."""
    from engine.build import build_raw_network

    export_dir = resolve_export_dir(path)
    cfg = from_dict(Config, yaml.safe_load((export_dir / "config.yaml").read_text()))
    net = build_raw_network(cfg)
    try:
        state = load_file(str(export_dir / "network.safetensors"))
    except Exception as exc:  # safetensors raises several types for a truncated or foreign file
        raise ValueError(f"'{export_dir / 'network.safetensors'}' is not a readable safetensors file ({exc}): "
                         "re-export it from the run's checkpoints") from None
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"'{export_dir}' does not match its config: missing keys {missing[:5]}, "
                         f"unexpected keys {unexpected[:5]}")
    meta = json.loads((export_dir / "meta.json").read_text()) if (export_dir / "meta.json").is_file() else {}
    return cfg, net.to(device).eval(), meta
