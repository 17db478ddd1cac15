"""benchmarks/: the per-iteration profiler's phases and counted work per pair (docs/method.md §8), the page."""
import csv

import pytest

from benchmarks import cost_per_pair, profile, report

TINY = ["data.resolution=8", "network.unet.channels=[8,16]", "network.unet.num_blocks=1",
        "network.unet.attn_resolutions=[4]", "mid.solver_steps=4", "mid.loss=l2", "post.loss=l2",
        "train.batch_size=8"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    teacher = tmp_path_factory.mktemp("teacher")
    _export_tiny_teacher(teacher)
    assert cost_per_pair.main(["--out", str(out / "cost_per_pair"), "--teacher", str(teacher), "--rounds", "2",
                               "--warmup", "0", "--set", *TINY]) == 0
    return out


def _export_tiny_teacher(path):
    import torch

    from engine.config import load_config
    from engine.models.factory import build_raw_network
    from engine.models.weights import export_network

    cfg = load_config(cost_per_pair.ROOT / "configs" / "digits.yaml", TINY)
    torch.manual_seed(0)
    export_network(build_raw_network(cfg), cfg, path / "export", meta={"stage": "pre"})


def test_counted_work_per_pair_matches_spec_accounting(results):
    with open(results / "cost_per_pair" / "cost_per_pair.csv", newline="") as f:
        rows = {r["method"]: {k: v for k, v in r.items()} for r in csv.DictReader(f)}
    got = {m: tuple(float(r[f"{k}_per_pair"]) for k in profile.WorkCounter.KEYS) for m, r in rows.items()}
    # (teacher fwd, student fwd with grad, without grad, student backward) per pair, docs/method.md §8:
    assert got["cmt"] == (1.0, 1.0, 0.0, 1.0)        # trajectory states reused: N NFEs for N pairs
    assert got["ct"] == (0.0, 1.0, 1.0, 1.0)         # no teacher, two student forwards
    assert got["cd_euler"] == (1.0, 1.0, 1.0, 1.0)
    assert got["cd_heun"] == (2.0, 1.0, 1.0, 1.0)
    assert 1.0 < got["slow_cmt"][0] <= 4.0            # a solve of up to N = 4 steps per pair
    assert float(rows["cmt"]["time_vs_cmt"]) == 1.0
    assert all(float(r["sec_per_iter_p50"]) > 0 for r in rows.values())


def test_profile_rows_and_page(results):
    prof = report.latest_profile(results / "profile.csv")
    assert set(prof) == set(cost_per_pair.METHODS)
    cmt = prof["cmt"]
    phases = sum(float(cmt[f"{p}_s"]["p50"]) for p in profile.PHASES)
    assert float(cmt["teacher_s"]["p50"]) > 0 and float(cmt["backward_s"]["p50"]) > 0
    assert phases <= float(cmt["total_s"]["p80"]) * 1.05   # the phases partition the iteration
    assert float(prof["ct"]["teacher_s"]["value"]) == 0.0
    assert report.main(["--results", str(results)]) == 0
    page = (results / "README.md").read_text()
    assert "| cd_heun | 2 | 1 | 1 | 1 |" in page and "python -m benchmarks.cost_per_pair" in page
    assert (results / "cost_per_pair.png").stat().st_size > 1000 and (results / "phases.png").is_file()


def test_profile_cli_bad_config_is_one_line(tmp_path, capsys):
    assert profile.main(["--stage", "mid", "--config", "configs/digits_cmt.yaml", "--csv", str(tmp_path / "p.csv"),
                         "--set", "mid.techer=x"]) == 2
    assert "did you mean" in capsys.readouterr().err


def test_count_eager_ignores_shape_checks_under_jvp():
    import torch

    from benchmarks.counting import count_eager

    x, t = torch.randn(64, 64), torch.randn(64, 64)
    plain = count_eager(lambda: torch.sin(x))
    assert plain["launches"] == 1 and plain["bytes_read"] == plain["bytes_written"] == 64 * 64 * 4
    under_jvp = count_eager(lambda: torch.func.jvp(torch.sin, (x,), (t,)))
    assert not any("is_same_size" in op or "has_same_storage" in op for op in under_jvp["ops"])
    assert under_jvp["launches"] >= 3        # sin, cos, mul at least
