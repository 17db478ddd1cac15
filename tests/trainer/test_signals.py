"""SIGTERM and SIGINT: the step finishes, a checkpoint is written, the run stops with one line and resumes to
the same result; a second signal stops at once. And SIGKILL at random moments, restarted until done."""
import json
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from tools.kill_matrix import matrix

LONGER = ["train.total_kimg=0.96", "train.checkpoint_every_kimg=0.64"]   # 30 steps, a checkpoint at 20


def wait_for_rows(run_dir, n, proc, timeout=300):
    deadline = time.time() + timeout
    path = run_dir / "log.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.02)
    raise AssertionError("the run ended or stalled before writing its log rows")


def rows(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k != "sec_per_kimg"}
            for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_checkpoints_the_step_and_the_resumed_run_is_identical(tmp_path, train_cli, sig):
    proc = train_cli(tmp_path / "stopped", *LONGER, wait=False)
    wait_for_rows(tmp_path / "stopped", 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 128 + sig, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"stopped: {sig.name} after step ") and "run the same command to resume" in last, last
    step = int(last.split("after step ")[1].split()[0])
    assert 0 < step < 30 and (tmp_path / "stopped" / "checkpoints" / f"step-{step:08d}" / "manifest.json").is_file()
    assert "Traceback" not in err

    again = train_cli(tmp_path / "stopped", *LONGER)
    assert again.returncode == 0, again.stderr[-2000:]
    full = train_cli(tmp_path / "full", *LONGER)
    assert full.returncode == 0, full.stderr[-2000:]
    a = load_file(str(tmp_path / "stopped" / "export" / "network.safetensors"))
    b = load_file(str(tmp_path / "full" / "export" / "network.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rows(tmp_path / "stopped") == rows(tmp_path / "full")      # the stop left no extra or partial row


def test_a_second_signal_stops_at_once(tmp_path, train_cli):
    proc = train_cli(tmp_path / "run", *LONGER, wait=False)
    wait_for_rows(tmp_path / "run", 1, proc)
    proc.send_signal(signal.SIGTERM)
    for line in iter(proc.stderr.readline, b""):    # the first one is being handled: send the second now
        if b"SIGTERM received" in line:
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "a second SIGTERM, without a checkpoint" in err.decode().strip().splitlines()[-1]


@pytest.mark.parametrize("stage_key", ["pre-edm", "mid-thread"])
def test_sigkill_at_random_moments_then_restarts_give_the_same_run(tmp_path, stage_key):
    """Two kills on fresh run dirs and two on one run dir; `make test-faults` runs ten of each, every stage."""
    fresh, repeated = matrix(stage_key, kills=2, work=tmp_path, seed=1)
    assert (fresh, repeated) == (2, 1)
