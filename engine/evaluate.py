"""Score an exported network: Fréchet distance in the digits-CNN feature space (NOT Inception FID).

    python -m engine.evaluate --run-dir runs/demo/pre --json metrics.json

The report sets the model's distance beside the held-out-data floor and beside the distance of the
same architecture untrained (initialised with the run's seed), so the number has both ends of its scale.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from engine.build import build_raw_network, model_kind
from engine.config import Config, ConfigError
from engine.metrics import METRIC_NAME, evaluate_images
from engine.sample import generate


def evaluate_network(net: torch.nn.Module, cfg: Config, kind: str, num_samples: int | None = None,
                     **sampler) -> dict:
    """Generate `num_samples` images as `kind` (engine.build.model_kind) and score them."""
    if cfg.data.source != "digits":
        raise ConfigError("engine.evaluate scores the embedded digits only (its feature net is trained on them); "
                          f"this run uses data.source={cfg.data.source}")
    images = generate(net, cfg, kind, num_samples or cfg.eval.num_samples, cfg.eval.seed, **sampler)
    return evaluate_images(images, resolution=cfg.data.resolution)


def report(net: torch.nn.Module, cfg: Config, meta: dict, num_samples: int | None = None,
           include_untrained: bool = True, **sampler) -> dict:
    t0 = time.time()
    kind = model_kind(cfg, meta.get("stage", "pre"))
    teacher = kind in ("edm", "flow")
    solver = {"kind": kind, "steps": sampler.get("steps") or (cfg.sample.steps if teacher else 1)}
    if teacher:
        solver.update(solver=sampler.get("solver") or cfg.sample.solver, order=sampler.get("order") or cfg.sample.order)
    out = {
        "metric": f"{METRIC_NAME}: Fréchet distance in the 64-d features of a CNN trained on the digits "
                  "(not Inception FID; compare only within this project, at equal sample counts)",
        "run": meta,
        "sampler": solver,
        "model": evaluate_network(net, cfg, kind, num_samples, **sampler),
    }
    if include_untrained:
        torch.manual_seed(cfg.train.seed)
        out["untrained"] = evaluate_network(build_raw_network(cfg).eval(), cfg, kind, num_samples, **sampler)
    out["seconds"] = round(time.time() - t0, 1)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="a training run dir (or its export/ dir)")
    p.add_argument("--json", required=True, help="where to write the report")
    p.add_argument("--num-samples", type=int, default=None, help="default: the run's eval.num_samples")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--solver", choices=["dpm_solver_pp", "heun", "euler"], default=None)
    p.add_argument("--order", type=int, choices=[1, 2, 3], default=None)
    p.add_argument("--no-untrained", action="store_true", help="skip scoring the untrained network")
    args = p.parse_args(argv)
    from engine.export import load_exported

    try:
        cfg, net, meta = load_exported(args.run_dir)
        out = report(net, cfg, meta, args.num_samples, not args.no_untrained,
                     solver=args.solver, steps=args.steps, order=args.order)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    m = out["model"]
    floor = m[f"{METRIC_NAME}_floor_297"]
    line = f"{METRIC_NAME}: model {m[METRIC_NAME]:.2f} ({m['fd_num_images']} images)"
    if f"{METRIC_NAME}_297" in m:
        line += f", at 297 images {m[f'{METRIC_NAME}_297']:.2f} vs data floor {floor:.2f}"
    if "untrained" in out:
        line += f"; untrained network {out['untrained'][METRIC_NAME]:.2f}"
    print(f"{line}  -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
