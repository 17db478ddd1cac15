"""The pre-training stage through the DeepSpeed trainer, run as users run it: `python engine/train.py`.

A tiny network on 8x8 digits keeps each run to seconds; what is checked is the machinery: export,
exact resume after SIGKILL, and one-line errors for bad input.
"""
import json
import signal
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file


def test_pretrain_exports_and_resumes_exactly_after_sigkill(tmp_path, train_cli):
    full = train_cli(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]
    export = tmp_path / "full" / "export"
    assert {"network.safetensors", "config.yaml", "meta.json"} <= {p.name for p in export.iterdir()}
    assert json.loads((export / "meta.json").read_text())["kimg"] == pytest.approx(0.64)
    rows = [json.loads(l) for l in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(2, 21, 2))

    # Kill the second run hard once its first checkpoint exists, then start it again.
    proc = train_cli(tmp_path / "killed", wait=False)
    latest = tmp_path / "killed" / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(latest.read_text())["step"]
    assert 0 < killed_at < 20, "the run finished before it could be killed: make TINY longer"
    again = train_cli(tmp_path / "killed")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed" in again.stderr or killed_at == 20

    a = load_file(str(export / "network.safetensors"))
    b = load_file(str(tmp_path / "killed" / "export" / "network.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run's EMA weights differ from the uninterrupted run"
    rows_b = [json.loads(l) for l in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows]
    assert [r["loss"] for r in rows_b] == [r["loss"] for r in rows]


def test_resume_refuses_a_different_recipe(tmp_path, train_cli):
    assert train_cli(tmp_path / "r", "train.total_kimg=0.128").returncode == 0
    res = train_cli(tmp_path / "r", "train.total_kimg=0.256", "optim.lr=1e-4")
    assert res.returncode == 2
    assert "different config (optim.lr: 0.002 -> 0.0001)" in res.stderr.strip().splitlines()[-1]
    # Extending the budget is allowed and continues from the checkpoint.
    res = train_cli(tmp_path / "r", "train.total_kimg=0.256")
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / "r" / "export" / "meta.json").read_text())["kimg"] == pytest.approx(0.256)


def _last_line(res):
    lines = res.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def test_bad_input_gives_one_line_errors(tmp_path, train_cli):
    res = train_cli(tmp_path / "a", "train.batchsize=4")
    assert res.returncode == 2 and "unknown config key 'train.batchsize'" in _last_line(res)
    assert "Traceback" not in res.stderr

    res = train_cli(tmp_path / "b", "data.source=folder", f"data.path={tmp_path / 'nowhere'}")
    assert res.returncode == 2 and "nowhere" in _last_line(res) and "does not exist" in _last_line(res)

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(folder / "big.png")
    res = train_cli(tmp_path / "c", "data.source=folder", f"data.path={folder}")
    line = _last_line(res)
    assert res.returncode == 2 and "big.png" in line and "32" in line and "resolution" in line, res.stderr[-1500:]

    res = train_cli(tmp_path / "d", stage="mid")
    assert res.returncode == 2 and "mid.teacher" in _last_line(res), res.stderr[-1500:]


@pytest.mark.parametrize("stage, config, extra", [
    ("pre", "digits.yaml", []),
    ("post", "digits_meanflow.yaml", ["post.init=random"]),
])
def test_bf16_under_zero_trains_and_its_checkpoints_load_safely(tmp_path, train_cli, stage, config, extra):
    """DeepSpeed's bf16 mode converts the network; the wrappers feed it bf16 and hand float32 back."""
    from engine.trainer.student import safe_load

    res = train_cli(tmp_path / "run", "train.precision=bf16", "train.zero_stage=1", "train.total_kimg=0.128",
                    *extra, stage=stage, config=config)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert rows and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    weights = load_file(str(tmp_path / "run" / "export" / "network.safetensors"))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
    for f in (tmp_path / "run" / "checkpoints").glob("step-*/*.pt"):
        assert safe_load(f, "cpu")


def test_every_snapshot_keeps_its_own_folder_in_training_order(tmp_path, train_cli):
    """One EMA export per 32-image step (0.032 kimg apart): 20 folders, named and sorted by the image count."""
    assert train_cli(tmp_path / "r", "train.snapshot_every_kimg=0.032").returncode == 0
    snaps = sorted((tmp_path / "r" / "snapshots").glob("kimg-*"))
    kimg = [json.loads((s / "meta.json").read_text())["kimg"] for s in snaps]
    assert kimg == [pytest.approx(0.032 * i) for i in range(1, 21)]
    assert snaps[0].name == "kimg-000000.032" and snaps[-1].name == "kimg-000000.640"
