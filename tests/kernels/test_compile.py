"""The sm_90 compile check (kernels.compiling, benchmarks.compile_kernels) in the default suite, no GPU.

Every spec of every kernel module's ``compile_specs()`` is built for sm_90 with Triton's bundled ptxas:
no spills for float16/bfloat16 IO, at most 255 registers, shared memory within an sm_90 block. This process
defines the kernels under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1), whose objects
``triton.compile`` cannot take, so the compile runs once for this module in a fresh process without the variable
(``compile_kernels.main`` reruns itself).

To stay fast this compiles a representative subset (ONLY): every DPM-step spec (~2 s) and the attention
kernels in bfloat16 at head dims 72 (the padded split) and 128 (the most registers) (~8 s); float16 builds the
same tiles. The full set (attention at d ∈ {64, 72, 128} × {fp16, bf16, fp32}, ~35 s on 2 cores) is
``make compile-check``.
"""
import csv
import re

import pytest
import torch

from benchmarks import compile_kernels
from kernels import compiling

ONLY = r"^dpm step |^attention .* d=(72|128) bfloat16 "     # regex on spec names; None compiles every spec
INTS = ("num_warps", "num_stages", "registers", "spill_stores", "spill_loads", "stack", "shared_static",
        "shared_dynamic", "shared", "vector_loads")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(exit code, rows of compile.csv, compile.md) of one run of the check."""
    out = tmp_path_factory.mktemp("compile")
    code = compile_kernels.main(["--out", str(out), *(["--only", ONLY] if ONLY else [])])
    with open(out / "compile.csv", newline="") as f:
        rows = [{k: int(v) if k in INTS else v for k, v in r.items()} for r in csv.DictReader(f)]
    return code, rows, (out / "compile.md").read_text()


def test_every_spec_compiles_for_sm90(compiled):
    """Exit 0 (no failure, spill or overflow) and one row per spec each module reported (modules' specs
    can only be listed in the compiling process: attention builds them from launches of compiled kernels)."""
    code, rows, md = compiled
    assert code == 0, md
    counts = {m: int(n) for m, n in re.findall(r"`([\w.]+)` \((\d+)(?: of \d+)? specs\)", md)}
    assert all(f"`{m}`" in md for m in compiling.KERNEL_MODULES) and counts.get("kernels.dpm_solver_step")
    assert all(counts[m] for m in counts), f"ONLY picks no spec of some module: {counts}"
    assert len(rows) == len({r["name"] for r in rows}) == sum(counts.values())
    assert {r["dtype"] for r in rows} == {"float16", "bfloat16", "float32"}


def test_no_spills_for_16_bit_io_and_everything_fits_an_sm90_block(compiled):
    _, rows, _ = compiled
    for r in rows:
        if compiling.spills_are_errors(r["dtype"]):
            assert r["spill_stores"] == r["spill_loads"] == 0, r
        assert 0 < r["registers"] <= compiling.MAX_REGISTERS, r
        assert r["shared"] == r["shared_static"] + r["shared_dynamic"] <= compiling.SM90_MAX_SHARED, r


def test_dpm_step_vectorises_its_streams(compiled):
    """1024 elements over 128 threads: one 16-byte load per input stream for 16-bit IO, two for fp32 — as
    long as numel is a multiple of 16 (otherwise the mask cannot be vectorised: the odd-numel case)."""
    _, rows, _ = compiled
    for r in rows:
        if r["name"].startswith("dpm step order 3") and "numel%16" not in r["name"]:
            assert r["vector_loads"] == (8 if r["dtype"] == "float32" else 4), r


def test_every_triton_module_is_checked(root):
    with_kernels = {".".join(p.relative_to(root).with_suffix("").parts)
                    for p in (root / "kernels").rglob("*.py") if re.search(r"^\s*@triton\.jit", p.read_text(), re.M)}
    assert with_kernels <= set(compiling.KERNEL_MODULES)


def test_report_flags_16_bit_spills_and_shared_overflow_only():
    base = dict(kernel="k", num_warps=4, num_stages=2, registers=255, stack=64, shared_static=0, cp_async=True,
                wgmma=False, vector_loads=2)
    rows = [dict(base, name="a bf16", dtype="bfloat16", spill_stores=8, spill_loads=8, shared_dynamic=0, shared=0),
            dict(base, name="a fp32", dtype="float32", spill_stores=8, spill_loads=8, shared_dynamic=0, shared=0),
            dict(base, name="b fp32", dtype="float32", spill_stores=0, spill_loads=0, shared_dynamic=240_000,
                 shared=240_000)]
    found = compile_kernels.problems(rows)
    assert len(found) == 2 and found[0].startswith("a bf16: spills 8 B") and found[1].startswith("b fp32: 240000 B")
    md = compile_kernels.markdown(rows, {"kernels.x": "3 specs"}, {"triton": "3.8.0", "ptxas": "12.9.86",
                                                                   "gpu_name": "sm_90a"})
    assert "| k | a fp32 | float32 | 4 | 2 | 255 | 8 / 8 | 64 | 0 (0 + 0) | yes | no | yes (2) |" in md
    assert "Triton 3.8.0's bundled ptxas 12.9.86" in md and "- a bf16: spills" in md


def test_interpreted_kernels_are_refused_with_the_way_out():
    from triton.runtime.interpreter import InterpretedFunction

    spec = compiling.all_compile_specs(["kernels.dpm_solver_step"])[0]
    if not isinstance(spec.fn, InterpretedFunction):
        pytest.skip("the kernels were defined without the interpreter in this run")
    assert spec.io_dtype == torch.float16
    with pytest.raises(TypeError, match="TRITON_INTERPRET"):
        compiling.compile_for_sm(spec)
