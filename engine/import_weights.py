"""Import published teacher weights into a config's network and write an export dir usable as `mid.teacher`.

    python -m engine.import_weights --config configs/paper/imagenet512_edm2xxl_pre.yaml \\
        --weights edm2-img512-xxl.safetensors --out runs/imagenet512-edm2xxl-pre

The file is a state dict: `.safetensors`, or `.pt`/`.pth` read with ``torch.load(weights_only=True)`` (a pickled
module is refused: convert it where its code lives, e.g. ``torch.save(net.state_dict(), "x.pt")``). A dict that
wraps the weights under one of ``ema``, ``state_dict``, ``model``, ``net`` is unwrapped. Key prefixes added by
wrappers (``unet.``, ``module.``, ``net.`` ...) are found automatically (the one that matches most keys) or
given with ``--strip-prefix``.

Strict where it matters: a network key missing from the file or a tensor of the wrong shape is an error (no
export is written) listing the keys; file keys the network does not have (e.g. EDM2's loss-weighting
``logvar_*`` head) are ignored and listed. ``RUN_DIR/export`` then holds ``network.safetensors`` +
``config.yaml`` + ``meta.json`` (stage ``--stage``, default ``pre``), and ``RUN_DIR/import_report.json``
the report.
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from engine.config import ConfigError, load_config
from engine.export import export_network

WRAPPER_KEYS = ("ema", "state_dict", "model", "net")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors by name from a .safetensors / .pt / .pth file; one-line ValueError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--weights '{path}' does not exist: pass a .safetensors, .pt or .pth state dict")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        reason = "it holds pickled objects, not only tensors" if isinstance(exc, pickle.UnpicklingError) \
            else str(exc).strip().splitlines()[0]
        raise ValueError(f"'{path}' is not a readable state dict ({reason}): save net.state_dict() with "
                         "torch.save or safetensors") from None
    if isinstance(state, dict) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        inner = [k for k in WRAPPER_KEYS if isinstance(state.get(k), dict)]
        if inner:
            state = state[inner[0]]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"'{path}' is not a flat state dict of tensors (nor wraps one under "
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
    from engine.build import build_raw_network

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML whose network.* / data.* the weights were trained with")
    p.add_argument("--weights", required=True, help=".safetensors, .pt or .pth state dict")
    p.add_argument("--out", required=True, help="run dir to create; the export goes to RUN_DIR/export")
    p.add_argument("--strip-prefix", default=None, help="key prefix to remove (default: found automatically)")
    p.add_argument("--stage", default="pre", choices=["pre", "mid", "post"],
                   help="what the weights compute: pre = EDM denoiser / FM velocity, post = flow map (e.g. MeanFlow)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    try:
        report = import_weights(args.config, args.weights, args.out, overrides=args.overrides,
                                prefix=args.strip_prefix, stage=args.stage)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"loaded {report['loaded']} tensors (prefix '{report['prefix']}'); ignored {len(report['unexpected'])} "
          f"unexpected keys {report['unexpected'][:5]}; export in {Path(args.out) / 'export'} (use as mid.teacher)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
