"""``python -m engine.import_weights --weights FILE --out RUN``: the same as ``cmt-import-weights``
(engine/cli/import_weights.py has the options; docs/teachers.md the released files)."""
from engine.cli.import_weights import main

if __name__ == "__main__":
    raise SystemExit(main())
