"""Import published teacher weights into a config's network and write an export dir usable as `mid.teacher`.

    cmt-import-weights --config configs/paper/imagenet512_edm2xxl_pre.yaml \\
        --weights edm2-img512-xxl.safetensors --out runs/imagenet512-edm2xxl-pre

engine/models/weights.py says which files are read and how keys are matched. ``RUN_DIR/export`` then holds
``network.safetensors`` + ``config.yaml`` + ``meta.json`` (stage ``--stage``, default ``pre``), and
``RUN_DIR/import_report.json`` the report.
"""
from __future__ import annotations

from pathlib import Path

from engine.cli import CommandParser, entry_point
from engine.models.weights import import_weights


@entry_point
def main(argv=None) -> int:
    p = CommandParser(description=__doc__)
    p.add_argument("--config", required=True, help="YAML whose network.* / data.* the weights were trained with")
    p.add_argument("--weights", required=True, help=".safetensors, .pt or .pth state dict")
    p.add_argument("--out", required=True, help="run dir to create; the export goes to RUN_DIR/export")
    p.add_argument("--strip-prefix", default=None, help="key prefix to remove (default: found automatically)")
    p.add_argument("--stage", default="pre", choices=["pre", "mid", "post"],
                   help="what the weights compute: pre = EDM denoiser / FM velocity, post = flow map (e.g. MeanFlow)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    report = import_weights(args.config, args.weights, args.out, overrides=args.overrides,
                            prefix=args.strip_prefix, stage=args.stage)
    print(f"loaded {report['loaded']} tensors (prefix '{report['prefix']}'); ignored {len(report['unexpected'])} "
          f"unexpected keys {report['unexpected'][:5]}; export in {Path(args.out) / 'export'} (use as mid.teacher)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
