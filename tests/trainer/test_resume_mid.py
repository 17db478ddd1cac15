"""Exact resume of mid-training through the CLI: SIGKILL after a checkpoint, restart, same run bit for bit.

The recipe makes every piece of state matter: dropout (the global RNG, reseeded per chunk), data-started
trajectories (the data position), gradient accumulation, RAdam with a linear lr decay (optimizer and
schedule), EMA with warm-up. The uninterrupted run makes its pairs in line; the killed one in a producer
thread that has pairs ready ahead of the student when it dies, which are simply made again after the
restart. The restarted process has none of the killed one's RNG history (python, numpy or torch), so a
bit-identical result also shows that no RNG state needs to be (or is) carried in a checkpoint.
"""
import json
import signal
import time

import torch
from safetensors.torch import load_file

from engine.trainer.student import safe_load

# 10 steps of 16 pairs in 2 micro-steps of 2 four-step trajectories; a checkpoint every 3 steps.
MID = ["network.dropout=0.2", "mid.solver_steps=4", "mid.loss=l2", "mid.data_start=true", "optim.name=radam",
       "optim.lr=1e-3", "optim.schedule=linear", "train.batch_size=16", "train.grad_accum=2",
       "train.total_kimg=0.16", "train.checkpoint_every_kimg=0.048", "train.log_every_kimg=0.016"]


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_mid_training_resumes_exactly_after_sigkill(tmp_path, train_cli, export_teacher, tiny_cfg):
    export_teacher(tmp_path / "teacher", tiny_cfg())
    mid = [*MID, f"mid.teacher={tmp_path / 'teacher'}"]
    proc = train_cli(tmp_path / "killed", *mid, "mid.pipeline=thread", stage="mid", wait=False)
    latest = tmp_path / "killed" / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)     # waiting for the run to write its first checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(latest.read_text())["step"]
    assert 0 < killed_at < 10, "the run finished before it could be killed: make MID longer"

    # What the checkpoint holds: model, optimizer, lr schedule (DeepSpeed), EMA, progress, data size (client).
    tag = json.loads(latest.read_text())["tag"]
    state = safe_load(tmp_path / "killed" / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu")
    assert state["module"] and state["optimizer"]["state"] and state["lr_scheduler"]["last_epoch"] == killed_at
    assert state["progress"] == {"step": killed_at, "nimg": 16 * killed_at}
    assert state["data"] == {"num_items": 1500} and state["ema"].keys() == state["module"].keys()

    again = train_cli(tmp_path / "killed", *mid, "mid.pipeline=thread", stage="mid")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed" in again.stderr

    # The uninterrupted run, also in a fresh process: an in-process run inherits what earlier tests left.
    full = train_cli(tmp_path / "full", *mid, "mid.pipeline=serial", stage="mid")
    assert full.returncode == 0, full.stderr[-2000:]

    a = load_file(str(tmp_path / "full" / "export" / "network.safetensors"))
    b = load_file(str(tmp_path / "killed" / "export" / "network.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run's EMA weights differ from the uninterrupted run"
    keys = ("kimg", "step", "loss", "lr", "grad_norm")
    assert [[r[k] for k in keys] for r in rows(tmp_path / "killed")] == \
        [[r[k] for k in keys] for r in rows(tmp_path / "full")]
    assert [r["step"] for r in rows(tmp_path / "full")] == list(range(1, 11))
