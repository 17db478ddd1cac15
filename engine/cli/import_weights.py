"""Import a released teacher (EDM / EDM2 snapshot .pkl, DiT / SiT .pt, or a state dict) as an export dir that
works as `mid.teacher` with no further step (docs/teachers.md lists every released file):

    cmt-import-weights --weights edm-cifar10-32x32-uncond-vp.pkl --out runs/cifar10-edm
    cmt-import-weights --weights SiT-XL-2-256x256.pt --config configs/teachers/SiT-XL-2-256x256.yaml --out runs/sit

A snapshot says its own network; other files need --config. No code from the file is run (the pickle is read
with a restricted unpickler). ``RUN/export`` gets ``network.safetensors`` (float32) + ``config.yaml`` +
``meta.json`` (stage, format, convention, ignored keys), ``RUN/import_report.json`` the report.
"""
from __future__ import annotations

from pathlib import Path

from engine.cli import CommandParser, entry_point
from engine.models.importer import import_weights


@entry_point
def main(argv=None) -> int:
    p = CommandParser(description=__doc__)
    p.add_argument("--weights", required=True, help="the released file: .pkl snapshot, .pt/.pth, .safetensors")
    p.add_argument("--out", required=True, help="run dir to create; the export goes to RUN/export")
    p.add_argument("--config", default=None,
                   help="YAML naming the network (configs/teachers/<file>.yaml); needed unless the file is a snapshot")
    p.add_argument("--strip-prefix", default=None, help="key prefix to remove (default: known or found)")
    p.add_argument("--stage", default="pre", choices=["pre", "mid", "post"],
                   help="what the weights compute: pre = a teacher (denoiser / velocity), post = a flow map (MeanFlow)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    report = import_weights(args.weights, args.out, config_path=args.config, overrides=args.overrides,
                            prefix=args.strip_prefix, stage=args.stage)
    ignored = f"; ignored {len(report['ignored'])} keys {report['ignored'][:3]}" if report["ignored"] else ""
    print(f"loaded {report['loaded']} tensors ({report['format']}, {'/'.join(report['stored_dtypes'])}, key prefix "
          f"'{report['prefix']}', convention {report['convention']}){ignored}; export in {Path(args.out) / 'export'} "
          "(use as mid.teacher)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
