"""Every Triton kernel compiled for sm_90 at the launches it would make, without a GPU.

    python -m benchmarks.compile_kernels --out benchmarks/results/kernels [--only REGEX]   (make compile-check)

Collects ``compile_specs()`` from each module of ``kernels.compiling.KERNEL_MODULES`` that defines one,
compiles each spec with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` and Triton's bundled ptxas,
and writes ``compile.md`` and ``compile.csv`` (registers, spills, stack, shared memory, and whether the PTX
uses cp.async, wgmma and vectorised global loads). Exits 1, after writing, with one line per offender, if a
float16/bfloat16 kernel spills registers, a kernel needs more shared memory than an sm_90 block may have,
or a spec fails to compile. Kernels defined under ``TRITON_INTERPRET=1`` cannot be compiled, so when that
variable is set the command runs itself again in a process without it.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
from pathlib import Path

from kernels import compiling

ROOT = Path(__file__).resolve().parent.parent
ARCH = 90
FIELDS = ["kernel", "name", "dtype", "num_warps", "num_stages", "registers", "spill_stores", "spill_loads",
          "stack", "shared_static", "shared_dynamic", "shared", "cp_async", "wgmma", "vector_loads"]


def compile_all(only: str | None = None) -> tuple[list[dict], dict[str, str], list[str]]:
    """(rows, {module: what was found}, compile failures) for every spec whose name matches ``only``."""
    rows, modules, failures = [], {}, []
    for module, specs in compiling.specs_by_module().items():
        if specs is None:
            modules[module] = "no compile_specs() yet"
            continue
        chosen = [s for s in specs if only is None or re.search(only, s.name)]
        modules[module] = f"{len(chosen)} of {len(specs)} specs" if only else f"{len(specs)} specs"
        for spec in chosen:
            try:
                rows.append(compiling.compile_for_sm(spec, ARCH))
            except Exception as e:  # one broken kernel must not hide the others' figures
                failures.append(f"{spec.name}: compile failed: {type(e).__name__}: {str(e).strip().splitlines()[0]}")
    return rows, modules, failures


def problems(rows: list[dict]) -> list[str]:
    """One line per row that would fail on the GPU or is not allowed to spill."""
    out = []
    for r in rows:
        spilled = r["spill_stores"] + r["spill_loads"]
        if spilled and compiling.spills_are_errors(r["dtype"]):
            out.append(f"{r['name']}: spills {r['spill_stores']} B stored / {r['spill_loads']} B loaded "
                       f"({r['registers']} registers, {r['num_warps']} warps) — 16-bit IO must not spill")
        if r["shared"] > compiling.SM90_MAX_SHARED:
            out.append(f"{r['name']}: {r['shared']} B shared memory > {compiling.SM90_MAX_SHARED} B per sm_90 block")
        if r["registers"] > compiling.MAX_REGISTERS:
            out.append(f"{r['name']}: {r['registers']} registers > {compiling.MAX_REGISTERS}")
    return out


def _yes(flag) -> str:
    return "yes" if flag else "no"


def markdown(rows: list[dict], modules: dict[str, str], versions: dict, failures=()) -> str:
    lines = [f"# Triton kernels compiled for sm_{ARCH} (no GPU run)", "",
             f"Compiled for sm_{ARCH} (`GPUTarget(\"cuda\", {ARCH}, 32)`, ptxas `--gpu-name={versions['gpu_name']}`) with "
             f"Triton {versions['triton']}'s bundled ptxas {versions['ptxas']}; no kernel was run, nothing was timed. "
             "Registers, stack and static shared memory: `cuobjdump -res-usage` of Triton's cubin; spill bytes: "
             "`ptxas -v` rerun with Triton's flags (same register count checked). Shared = static + dynamic (Triton's "
             f"`metadata.shared`, what the launch requests); an sm_{ARCH} block may use {compiling.SM90_MAX_SHARED:,} B. "
             "Spills fail the check for float16/bfloat16 IO. Vector loads: `ld.global.v2`/`.v4` in the PTX.", "",
             "Modules checked: " + ", ".join(f"`{m}` ({what})" for m, what in modules.items()) + ".", "",
             "| kernel | case | dtype | warps | stages | registers | spill bytes (st / ld) | stack B | "
             "shared B (static + dynamic) | cp.async | wgmma | vector loads |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vec = f"yes ({r['vector_loads']})" if r["vector_loads"] else "no"
        lines.append(f"| {r['kernel']} | {r['name']} | {r['dtype']} | {r['num_warps']} | {r['num_stages']} | "
                     f"{r['registers']} | {r['spill_stores']} / {r['spill_loads']} | {r['stack']} | "
                     f"{r['shared']} ({r['shared_static']} + {r['shared_dynamic']}) | {_yes(r['cp_async'])} | "
                     f"{_yes(r['wgmma'])} | {vec} |")
    found = [*problems(rows), *failures]
    lines += ["", "Problems:" if found else "No spills in float16/bfloat16 kernels; every kernel fits an sm_90 block."]
    lines += [f"- {p}" for p in found]
    return "\n".join(lines) + "\n"


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if _interpreter_on():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "benchmarks.compile_kernels", *argv], cwd=ROOT, env=env).returncode
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kernels")
    parser.add_argument("--only", help="compile only the specs whose name matches this regex")
    args = parser.parse_args(argv)
    rows, modules, failures = compile_all(args.only)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "compile.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    text = markdown(rows, modules, compiling.tool_versions(ARCH), failures)
    (args.out / "compile.md").write_text(text)
    print(text)
    found = [*problems(rows), *failures]
    for line in found:
        print(line, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
