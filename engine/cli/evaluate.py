"""Score an exported network: Fréchet distance in the digits-CNN feature space (NOT Inception FID).

    cmt-evaluate --run-dir runs/demo/pre --json metrics.json

The report sets the model's distance beside the held-out-data floor and beside the distance of the
same architecture untrained (initialised with the run's seed), so the number has both ends of its scale.
"""
from __future__ import annotations

import json
from pathlib import Path

from engine.cli import CommandParser, entry_point, positive
from engine.eval.frechet import METRIC_NAME
from engine.eval.report import report
from engine.models.weights import load_exported


@entry_point
def main(argv=None) -> int:
    p = CommandParser(description=__doc__)
    p.add_argument("--run-dir", required=True, help="a training run dir (or its export/ dir)")
    p.add_argument("--json", required=True, help="where to write the report")
    p.add_argument("--num-samples", type=positive, default=None, help="default: the run's eval.num_samples")
    p.add_argument("--steps", type=positive, default=None)
    p.add_argument("--solver", choices=["dpm_solver_pp", "heun", "euler"], default=None)
    p.add_argument("--order", type=int, choices=[1, 2, 3], default=None)
    p.add_argument("--no-untrained", action="store_true", help="skip scoring the untrained network")
    args = p.parse_args(argv)
    cfg, net, meta = load_exported(args.run_dir)
    out = report(net, cfg, meta, args.num_samples, not args.no_untrained,
                 solver=args.solver, steps=args.steps, order=args.order)
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
    raise SystemExit(main())
