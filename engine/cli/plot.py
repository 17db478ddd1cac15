"""Loss curves from a run's log.jsonl, as a PNG (several --run-dir: overlaid).

    cmt-plot --run-dir runs/demo/pre --out loss.png
"""
from __future__ import annotations

from pathlib import Path

from engine.cli import CommandParser, entry_point
from engine.eval.plots import plot_losses, read_log


@entry_point
def main(argv=None) -> int:
    p = CommandParser(description=__doc__)
    p.add_argument("--run-dir", action="append", required=True, help="repeat to overlay several runs")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    runs = {Path(d).name: read_log(d) for d in args.run_dir}
    print(f"wrote {plot_losses({'training loss': runs}, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
