"""benchmarks/gpu_check.py on a CPU machine: its pure parts, its no-CUDA exit, and its timing code end to end
in the interpreter (never GPU numbers, never written under benchmarks/results)."""
import csv
import math
from dataclasses import astuple

import pytest
import torch

from benchmarks import gpu_check as gc


def _stats(err, truth):
    return gc.ErrorStats.of(truth + err, truth)


def test_rule_allows_twice_torchs_error_plus_a_floor_of_one_ulp():
    truth = torch.ones(1000, dtype=torch.float64)

    def full(e):
        return _stats(torch.full((1000,), e, dtype=torch.float64), truth)

    ulp = torch.finfo(torch.float16).eps
    bound = 2 * 1e-3 + ulp
    use, failure = gc.check_error(full(0.99 * bound), full(1e-3), torch.float16)
    assert failure is None and use == pytest.approx(0.99)
    use, failure = gc.check_error(full(1.05 * bound), full(1e-3), torch.float16)
    assert use == pytest.approx(1.05) and "max error" in failure and "rms error" in failure
    # exact PyTorch: only the floor (one ulp of the truth's size) is allowed
    assert gc.check_error(full(0.9 * ulp), full(0.0), torch.float16)[1] is None
    assert gc.check_error(full(1.1 * ulp), full(0.0), torch.float16)[1] is not None


def test_rule_catches_one_wrong_element_by_the_max_and_takes_the_least_accurate_torch_op():
    truth = torch.randn(10_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    theirs = _stats(1e-3 * torch.randn(10_000, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),
                    truth)
    err = torch.zeros(10_000, dtype=torch.float64)
    err[-1] = 0.05                                    # one wrong element (a bad tail lane): RMS alone misses it
    _, failure = gc.check_error(_stats(err, truth), theirs, torch.float16)
    assert failure.startswith("max error") and "rms" not in failure
    looser = _stats(torch.full((10_000,), 0.03, dtype=torch.float64), truth)
    assert gc.check_error(_stats(err, truth), [theirs, looser], torch.float16)[1] is None


def test_error_stats_add_up_over_chunks_and_carry_a_relative_error():
    g = torch.Generator().manual_seed(2)
    value, truth = torch.randn(1000, generator=g), torch.randn(1000, generator=g, dtype=torch.float64)
    whole = gc.ErrorStats.of(value, truth)
    assert astuple(gc.ErrorStats.of(value, truth, chunk=64)) == pytest.approx(astuple(whole))
    assert astuple(gc.ErrorStats.of(value[:300], truth[:300]) + gc.ErrorStats.of(value[300:], truth[300:])) == \
        pytest.approx(astuple(whole))
    other = gc.ErrorStats.of(10 * truth, 10 * truth)          # a truth 10x larger, no error of its own
    carried = whole.carried_to(other).metrics()
    for metric, (err, size) in whole.metrics().items():
        assert carried[metric][0] == pytest.approx(10 * err)
        assert carried[metric][1] == pytest.approx(10 * size)
    with pytest.raises(ValueError, match="differ in shape"):
        gc.ErrorStats.of(value[:5], truth)


@pytest.mark.parametrize("name, label", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM"), ("NVIDIA H100 NVL", None), ("NVIDIA H200 NVL", None),
    ("NVIDIA A100-SXM4-40GB", None), ("NVIDIA GeForce RTX 4090", None)])
def test_peak_table_by_device_name(name, label):
    peak = gc.peak_for(name)
    assert (peak and peak.label) == label
    if label == "H100 SXM":
        assert (peak.hbm_tb_s, peak.tflops_16bit) == (3.35, 989.0)


def test_device_slug_is_a_file_name():
    assert gc.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert gc.device_slug("NVIDIA A100-SXM4-80GB") == "nvidia-a100-sxm4-80gb"
    assert gc.device_slug("???") == "unknown-device"


def test_fused_step_bytes_is_what_the_interpreter_counts():
    """The GB/s of the fused step divide this count, so it must equal the kernel's measured traffic."""
    import kernels.dpm_solver_step as kds
    from benchmarks.counting import count_triton
    from kernels import dispatch

    assert kds.interpreted()
    for dtype in (torch.float32, torch.bfloat16):
        for order in (1, 2, 3):
            tensors = [torch.randn(3, 5, 7, 9).to(dtype) for _ in range(order + 1)]
            with dispatch.forced("dpm_solver_step", "triton"):
                counted = count_triton(kds.dpm_solver_pp_step, *tensors, coeffs=(0.5, 0.25, 0.125, 0.0625))
            assert counted["bytes_read"] + counted["bytes_written"] == gc.fused_step_bytes(order, tensors[0])


FAKE_INFO = dict(device="NVIDIA H100 80GB HBM3", torch="2.14.1", triton="3.8.0", cuda="13.0",
                 date="2030-01-01 00:00 UTC", mode="full", seconds=421.0, peak=gc.peak_for("NVIDIA H100 80GB HBM3"),
                 hardware="132 SMs, 79 GiB, compute capability 9.0.", crashed=[])


def _fake_rows():
    base = dict(dtype="bf16", head_dim=64, seq_len=1024, shape="16x16x1024x64", status="ok", timer="cuda-graph")
    return [
        dict(section="test", name="test_dpm_step_matches_truth[bf16-order1-64x4x64x64]", status="passed", ms=812.0,
             value=0.41, detail="worst error/bound 0.410 (step)"),
        dict(section="test", name="test_attention_over_2_31_elements[bf16]", status="failed", ms=9000.0,
             detail="AssertionError: forward: max error ..."),
        *[dict(section="dpm_step", name="large", impl=impl, dtype="bf16", shape="128x16x128x128", order=o,
               ms=0.1 * o * (1 if impl == "fused" else 4), gb_s=3000.0 if impl == "fused" else 2500.0,
               pct_hbm=89.6 if impl == "fused" else 74.6, status="ok", timer="cuda-events")
          for o in (1, 2, 3) for impl in ("fused", "eager")],
        dict(section="attention_jvp", impl="jvp_attention", ms=0.5, tflop_s=400.0, pct_peak_flops=40.4, **base),
        dict(section="attention_jvp", impl="attention_jvp", ms=0.45, tflop_s=444.0, **base),
        dict(section="attention_jvp", impl="math", ms=2.0, tflop_s=100.0, **base),
        dict(section="attention_forward", impl="jvp_attention", ms=0.2, tflop_s=330.0, **base),
        dict(section="attention_forward", impl="sdpa-flash", ms=0.15, tflop_s=500.0, **base),
        dict(section="attention_forward", impl="sdpa-flash", dtype="fp16", head_dim=72, seq_len=256,
             shape="64x16x256x72", status="error", detail="OutOfMemoryError: CUDA out of memory"),
    ]


def test_goals_from_rows():
    dpm, faster, per_flop = gc.judge_goals(_fake_rows(), gc.FULL, FAKE_INFO["peak"], smoke=False)
    assert (dpm["status"], dpm["value"]) == ("PASS", 89.6)
    assert (faster["status"], faster["value"]) == ("PASS", 4.0)
    assert (per_flop["status"], per_flop["value"]) == ("PASS", 1.25)
    unknown = gc.judge_goals(_fake_rows(), gc.FULL, None, smoke=False)[0]
    assert unknown["status"] == "peak unknown" and "3000 GB/s" in unknown["detail"]
    nothing = gc.judge_goals([], gc.FULL, FAKE_INFO["peak"], smoke=False)
    assert [g["status"] for g in nothing] == ["not measured"] * 3


def test_writer_makes_one_csv_row_per_measurement_and_a_readable_page(tmp_path):
    rows = _fake_rows()
    rows += gc.judge_goals(rows, gc.FULL, FAKE_INFO["peak"], smoke=False)
    csv_path, md_path = gc.write_results(tmp_path / "gpu", "nvidia-h100-80gb-hbm3", rows, FAKE_INFO)
    with open(csv_path, newline="") as f:
        read = list(csv.DictReader(f))
    assert len(read) == len(rows) and list(read[0]) == gc.FIELDS
    page = md_path.read_text()
    assert page.startswith("# GPU check: NVIDIA H100 80GB HBM3")
    for text in ("torch 2.14.1, triton 3.8.0, CUDA 13.0", "2030-01-01", "H100 SXM, 3.35 TB/s",
                 "| DPM step at >= 80% of HBM bandwidth", "| PASS |", "1 passed, 1 failed",
                 "| 128x16x128x128 | bf16 | 3 | 0.3 | 3000 | 89.6 | 1.2 | 2500 | 4.00x |",
                 "| bf16 | 16x16x1024x64 | 0.5 | 400.0 (40.4%) |", "OutOfMemoryError", "## Not measured"):
        assert text in page, text


def test_without_cuda_one_line_exit_0_and_nothing_written(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu"
    assert gc.main(["--out", str(out)]) == 0
    assert capsys.readouterr().out == ("gpu-check: no CUDA device here (torch.cuda.is_available() is False); "
                                       "nothing measured\n")
    assert not out.exists()


def test_interpreter_smoke_runs_every_timing_path_and_claims_no_gpu_numbers(tmp_path, capsys):
    assert gc.main(["--interpret-smoke", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "interpreter-smoke.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    measured = [r for r in rows if r["section"] in ("dpm_step", "attention_jvp", "attention_forward")]
    assert len(measured) == 2 * 3 * 2 + 2 * 5 and all(r["status"] == "ok" for r in measured)
    assert {r["timer"] for r in measured} == {"cpu-perf-counter"} and not any(r["pct_hbm"] for r in rows)
    assert all(math.isfinite(float(r["ms"])) for r in measured)
    goals = [r for r in rows if r["section"] == "goal"]
    assert len(goals) == 3 and all(g["status"].startswith("not judged") for g in goals)
    assert "not GPU numbers" in (tmp_path / "interpreter-smoke.md").read_text()
    assert "PASS" not in capsys.readouterr().out
    before = sorted(gc.RESULTS.rglob("*"))
    assert gc.main(["--interpret-smoke", "--out", str(gc.RESULTS / "gpu")]) == 2
    assert sorted(gc.RESULTS.rglob("*")) == before


FAKE_GPU_TESTS = """
import os
import pytest

pytestmark = pytest.mark.gpu


def test_passes_with_its_error_use(record_property):
    assert os.environ["TRITON_INTERPRET"] == "0"      # never the interpreter, whatever the parent had
    record_property("forward", "0.5")
    record_property("tangent", "0.8125")


def test_fails():
    assert False, "forward: max error 1 > 2 x PyTorch's"


def test_skips():
    pytest.skip("the CUDA extension is not built here")
"""


def test_tests_section_runs_pytest_without_the_interpreter_and_reads_every_outcome(tmp_path, monkeypatch):
    test_file = tmp_path / "test_fake_gpu.py"
    test_file.write_text(FAKE_GPU_TESTS)
    monkeypatch.setattr(gc, "TEST_FILE", test_file)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    run = gc.Run(gc.Plan("t", None, (), (), ()), torch.device("cpu"), None, smoke=False)
    gc.run_tests(run, budget=120)
    rows = {r["name"]: r for r in run.rows}
    assert set(rows) == {"test_passes_with_its_error_use", "test_fails", "test_skips"}
    assert rows["test_passes_with_its_error_use"]["status"] == "passed"
    assert rows["test_passes_with_its_error_use"]["value"] == 0.812
    assert "tangent" in rows["test_passes_with_its_error_use"]["detail"]
    assert rows["test_fails"]["status"] == "failed" and "max error 1" in rows["test_fails"]["detail"]
    assert rows["test_skips"]["status"] == "skipped" and "not built" in rows["test_skips"]["detail"]


def test_tests_section_records_a_run_that_did_not_finish(tmp_path, monkeypatch):
    test_file = tmp_path / "test_slow_gpu.py"
    test_file.write_text("import time\n\nimport pytest\n\n\n@pytest.mark.gpu\ndef test_sleeps():\n    time.sleep(60)\n")
    monkeypatch.setattr(gc, "TEST_FILE", test_file)
    run = gc.Run(gc.Plan("t", None, (), (), ()), torch.device("cpu"), None, smoke=False)
    gc.run_tests(run, budget=3)
    assert run.rows[-1]["status"] == "error" and "did not finish within" in run.rows[-1]["detail"]
