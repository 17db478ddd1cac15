"""Checkpoints that never lie: damaged ones are named and fallen back from, none runs code, the run dir is
locked, the export always comes from the last checkpoint, and the log always reads as one run.

A reference run (20 steps of a tiny pre-training, checkpoints every 4 steps, the last two kept: step-16 and
step-20) is damaged in one way per test, resumed, and must finish identical to the reference.
"""
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.files import sha256
from engine.trainer.student import safe_load

MODEL = "mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, train_cli):
    """A finished tiny pre-training run (checkpoints step-16 and step-20), made once for the module."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    res = train_cli(run_dir)
    assert res.returncode == 0, res.stderr[-2000:]
    return run_dir


def copy_of(reference, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    return run_dir


def assert_same_as(run_dir, reference):
    a = load_file(str(run_dir / "export" / "network.safetensors"))
    b = load_file(str(reference / "export" / "network.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "exported weights differ"
    strip = lambda rows: [{k: v for k, v in r.items() if k != "sec_per_kimg"} for r in rows]   # noqa: E731
    assert strip(log(run_dir)) == strip(log(reference))
    assert json.loads((run_dir / "export" / "meta.json").read_text())["checkpoint"] == "step-00000020"


def log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def reseal(path: Path) -> None:
    """Recompute a checkpoint's manifest for its (altered) files, as an attacker who can write it would."""
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"] = {p.relative_to(path).as_posix(): sha256(p) for p in path.rglob("*")
                         if p.is_file() and p.name != "manifest.json"}
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_the_reference_has_verified_checkpoints_and_an_export_from_the_last(reference):
    ck = reference / "checkpoints"
    assert sorted(p.name for p in ck.glob("step-*")) == ["step-00000016", "step-00000020"]
    manifest = json.loads((ck / "step-00000020" / "manifest.json").read_text())
    assert manifest["step"] == 20 and manifest["stage"] == "pre" and manifest["config"]["optim"]["lr"] == 0.002
    assert manifest["files"][MODEL] == sha256(ck / "step-00000020" / MODEL)
    assert json.loads((reference / "export" / "meta.json").read_text())["checkpoint"] == "step-00000020"
    assert not (reference / "run.lock").exists()           # released on exit


def _truncate(p): p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
def _zero(p): p.write_bytes(bytes(p.stat().st_size))
def _empty(p): p.write_bytes(b"")


def _flip(p):
    data = bytearray(p.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _zero, _empty, _flip, Path.unlink],
                         ids=["truncated", "zeroed", "emptied", "64-bytes-flipped", "deleted"])
def test_a_damaged_newest_checkpoint_is_named_and_the_run_falls_back(reference, tmp_path, damage, train_cli):
    run_dir = copy_of(reference, tmp_path)
    damage(run_dir / "checkpoints" / "step-00000020" / MODEL)
    res = train_cli(run_dir)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "step-00000020 is damaged" in res.stderr and "resumed from" in res.stderr and "step-00000016" in res.stderr
    assert (run_dir / "checkpoints" / "damaged" / "step-00000020").is_dir()    # kept for a look, out of the way
    assert_same_as(run_dir, reference)


@pytest.mark.parametrize("latest", ["missing tag", "deleted", "not json", "outside the run dir"])
def test_latest_json_is_only_a_hint(reference, tmp_path, latest, train_cli):
    """The newest verified checkpoint is resumed whatever latest.json says; a tag never leaves checkpoints/."""
    run_dir = copy_of(reference, tmp_path)
    path = run_dir / "checkpoints" / "latest.json"
    if latest == "deleted":
        path.unlink()
    else:
        text = {"missing tag": '{"tag": "step-00000099"}', "not json": "{oops",
                "outside the run dir": '{"tag": "../../elsewhere"}'}[latest]
        path.write_text(text)
    shutil.rmtree(run_dir / "export")
    res = train_cli(run_dir)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stderr and "step-00000020" in res.stderr
    assert_same_as(run_dir, reference)


def test_a_planted_pickle_payload_never_runs(reference, tmp_path, train_cli):
    """Even with a manifest that matches (an attacker who can write the run dir), a checkpoint file holding
    anything but tensors is refused unexecuted, named, and the run falls back."""
    run_dir = copy_of(reference, tmp_path)
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    target = run_dir / "checkpoints" / "step-00000020" / MODEL
    state = safe_load(target)                        # our own file, before the payload goes in
    state["extra"] = Payload()
    torch.save(state, target)
    reseal(run_dir / "checkpoints" / "step-00000020")
    res = train_cli(run_dir)
    assert res.returncode == 0, res.stderr[-2000:]
    assert not marker.exists(), "the payload ran"
    assert "step-00000020 is damaged (it does not load" in res.stderr and "Unpickl" in res.stderr
    assert_same_as(run_dir, reference)


def test_zero_optimizer_files_are_read_without_unpickling_code(tmp_path, train_cli):
    """ZeRO 1-3 pickle a few DeepSpeed types into their optimizer files: exactly those are allowed."""
    from engine.trainer.student import safe_load

    run_dir = tmp_path / "z1"
    res = train_cli(run_dir, "train.zero_stage=1", "train.total_kimg=0.128")
    assert res.returncode == 0, res.stderr[-2000:]
    files = sorted((run_dir / "checkpoints").glob("step-*/*.pt"))
    assert any("optim_states" in f.name for f in files)
    for f in files:
        assert safe_load(f, "cpu")


def test_a_second_run_on_a_run_dir_is_refused_and_a_stale_lock_taken_over(reference, tmp_path, train_cli):
    run_dir = copy_of(reference, tmp_path)
    started = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19]
    lock = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}   # this (live) process
    (run_dir / "run.lock").write_text(json.dumps(lock))
    res = train_cli(run_dir)
    assert res.returncode == 2 and f"in use by pid {os.getpid()}" in res.stderr.strip().splitlines()[-1]
    (run_dir / "run.lock").write_text(json.dumps({**lock, "started": "0"}))      # the pid now runs another process
    res = train_cli(run_dir)
    assert res.returncode == 0 and "taking over the stale lock" in res.stderr, res.stderr[-2000:]
    assert not (run_dir / "run.lock").exists()


def test_an_export_not_made_from_the_last_checkpoint_is_remade(reference, tmp_path, train_cli):
    """A kill between the final checkpoint and its export leaves the previous export: the restart re-makes it."""
    run_dir = copy_of(reference, tmp_path)
    meta = json.loads((run_dir / "export" / "meta.json").read_text())
    (run_dir / "export" / "meta.json").write_text(json.dumps({**meta, "checkpoint": "step-00000016", "step": 16}))
    weights = load_file(str(run_dir / "export" / "network.safetensors"))
    from safetensors.torch import save_file
    save_file({k: v + 1 for k, v in weights.items()}, str(run_dir / "export" / "network.safetensors"))
    res = train_cli(run_dir)
    assert res.returncode == 0, res.stderr[-2000:]
    assert_same_as(run_dir, reference)


def test_the_log_is_reconciled_on_every_start(reference, tmp_path, train_cli):
    """Rows after the resumed step go, and so does a half-written last line; a fresh run starts a fresh log."""
    run_dir = copy_of(reference, tmp_path)
    shutil.rmtree(run_dir / "checkpoints" / "step-00000020")
    shutil.rmtree(run_dir / "export")
    with open(run_dir / "log.jsonl", "a") as f:
        f.write('{"kimg": 0.7, "step": 2')                  # a kill in the middle of a row
    res = train_cli(run_dir)
    assert res.returncode == 0, res.stderr[-2000:]
    assert_same_as(run_dir, reference)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "log.jsonl").write_text('{"kimg": 0.064, "step": 2, "loss": 9}\n')   # a run killed before any checkpoint
    res = train_cli(fresh)
    assert res.returncode == 0, res.stderr[-2000:]
    assert [r["step"] for r in log(fresh)] == list(range(2, 21, 2)) and log(fresh)[0]["loss"] != 9


def test_rotation_keeps_the_checkpoint_resumed_from(reference, tmp_path, train_cli):
    run_dir = copy_of(reference, tmp_path)
    _zero(run_dir / "checkpoints" / "step-00000020" / MODEL)
    res = train_cli(run_dir, "train.keep_checkpoints=1")
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-00000016", "step-00000020"]


def test_a_full_disk_names_the_checkpoint_and_says_the_previous_one_is_intact(tmp_path, monkeypatch, tiny_cfg):
    import errno

    from engine.errors import DiskFullError
    from engine.trainer import Trainer

    cfg = tiny_cfg()
    cfg.train.batch_size, cfg.train.total_kimg, cfg.train.checkpoint_every_kimg = 32, 0.128, 0.064
    cfg.train.progress = False
    trainer = Trainer(cfg, "pre", tmp_path / "run")
    engine, saves = trainer.student.engine, []
    original = engine.checkpoint_engine.save

    def fills_up(state_dict, path):
        saves.append(path)
        if len(saves) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(state_dict, path)
    monkeypatch.setattr(engine.checkpoint_engine, "save", fills_up)
    with pytest.raises(DiskFullError, match=r"the disk is full: checkpoint .*step-00000004 could not be written "
                                            r".*the previous checkpoint .*step-00000002 is intact"):
        trainer.fit()
    ck = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["latest.json", "step-00000002"]   # no half-written one left
    assert not (tmp_path / "run" / "run.lock").exists()
