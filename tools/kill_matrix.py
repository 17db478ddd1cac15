"""The kill matrix: SIGKILL tiny runs at random moments, restart them until they finish, compare with an
uninterrupted run. What must be identical: the exported weights, the last checkpoint's model and optimizer
state, and log.jsonl (every row and value but the wall-clock ones).

    python -m tools.kill_matrix                       # every stage, 10 kills each: what `make test-faults` runs
    python -m tools.kill_matrix --stages pre-edm --kills 3

For each stage it runs 10 fresh run dirs, each killed once and restarted, and one run dir killed 10 times
in a row, and prints ``k/10 identical`` for both; it exits 1 unless every count is 10/10.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
# 20 steps of 32 images; checkpoints every 3 steps and log rows every 2, so a resume falls inside an interval.
TINY = ["data.resolution=8", "network.unet.channels=[8,16]", "network.unet.num_blocks=1",
        "network.unet.attn_resolutions=[]", "train.batch_size=32", "train.total_kimg=0.64",
        "train.checkpoint_every_kimg=0.096", "train.log_every_kimg=0.064", "train.progress=false",
        "network.dropout=0.1"]
MID = ["mid.solver_steps=4", "mid.loss=l2", "mid.data_start=true", "optim.name=radam", "optim.lr=1e-3",
       "optim.schedule=linear", "train.grad_accum=2"]
POST = ["post.init=random", "post.q=64", "post.loss=l2"]
STAGES = {   # name: (stage, config, overrides, processes)
    "pre-edm": ("pre", "digits.yaml", [], 1),
    "pre-flow": ("pre", "digits_fm.yaml", [], 1),
    "mid-serial": ("mid", "digits_cmt.yaml", [*MID, "mid.pipeline=serial"], 1),
    "mid-thread": ("mid", "digits_cmt.yaml", [*MID, "mid.pipeline=thread"], 1),
    "mid-teacher-ranks": ("mid", "digits_cmt.yaml", [*MID, "mid.pipeline=teacher_ranks"], 2),
    "post-ect": ("post", "digits_ect.yaml", POST, 1),
    "post-meanflow": ("post", "digits_meanflow.yaml", ["post.init=random", "optim.lr=1e-3"], 1),
}
TIMING = ("sec_per_kimg", "teacher_sec", "student_sec")


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(stage_key: str, run_dir: Path, teacher: Path | None) -> list[str]:
    stage, config, overrides, nproc = STAGES[stage_key]
    sets = [*TINY, *overrides] + ([f"mid.teacher={teacher}"] if stage == "mid" else [])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
                "127.0.0.1", "--master_port", str(_free_port())] if nproc > 1 else [sys.executable]
    cmd = [*launcher, str(ROOT / "engine" / "train.py"), "--stage", stage, "--config", str(ROOT / "configs" / config),
           "--run-dir", str(run_dir)]
    for o in sets:
        cmd += ["--set", o]
    return cmd


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def run(stage_key: str, run_dir: Path, teacher: Path | None, kill_after: float | None = None) -> int | None:
    """Run (or resume) a stage; with ``kill_after`` SIGKILL its whole process group after that many seconds.
    Returns the exit code, or None when it was killed."""
    proc = subprocess.Popen(command(stage_key, run_dir, teacher), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=_env(), start_new_session=True)
    try:
        proc.wait(timeout=kill_after if kill_after is not None else 900)
    except subprocess.TimeoutExpired:
        if kill_after is None:
            raise
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None
    finally:
        proc.stderr.close()
    return proc.returncode


def finish(stage_key: str, run_dir: Path, teacher: Path | None) -> None:
    code = run(stage_key, run_dir, teacher)
    if code != 0:
        raise RuntimeError(f"{stage_key}: the restart in {run_dir} failed with exit code {code}")


def _tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _tensors(obj[k], f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]")


def fingerprint(run_dir: Path) -> dict:
    """What must match: export weights, the last checkpoint's tensors (model, optimizer, EMA), log rows."""
    from engine.trainer.student import safe_load

    export = load_file(str(run_dir / "export" / "network.safetensors"))
    tags = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    checkpoint = {}
    for f in sorted((run_dir / "checkpoints" / tags[-1]).glob("*.pt")):
        checkpoint.update({f"{f.name}{k}": v for k, v in _tensors(safe_load(f, "cpu"))})
    rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {"export": export, "checkpoint": (tags[-1], checkpoint), "log": rows}


def same(a: dict, b: dict) -> str | None:
    """None when identical, else what differs."""
    if a["export"].keys() != b["export"].keys() or not all(torch.equal(a["export"][k], b["export"][k])
                                                              for k in a["export"]):
        return "exported weights differ"
    (tag_a, ck_a), (tag_b, ck_b) = a["checkpoint"], b["checkpoint"]
    if tag_a != tag_b or ck_a.keys() != ck_b.keys():
        return f"last checkpoints differ ({tag_a} vs {tag_b})"
    bad = [k for k in ck_a if not torch.equal(ck_a[k], ck_b[k])]
    if bad:
        return f"checkpoint tensors differ: {bad[:3]}"
    if a["log"] != b["log"]:
        diff = next(i for i, (x, y) in enumerate(zip(a["log"] + [None], b["log"] + [None])) if x != y)
        return f"log rows differ from row {diff}"
    return None


def teacher_for(stage_key: str, work: Path) -> Path | None:
    if STAGES[stage_key][0] != "mid":
        return None
    teacher = work / "teacher"
    if not (teacher / "export").is_dir():
        finish("pre-edm", teacher, None)
    return teacher


def matrix(stage_key: str, kills: int, work: Path, seed: int = 0, log=print) -> tuple[int, int]:
    """(fresh run dirs identical, out of ``kills``; 1 if the run dir killed ``kills`` times is identical)."""
    rng = random.Random(seed)
    teacher = teacher_for(stage_key, work)
    reference = work / f"{stage_key}-reference"
    started = time.perf_counter()
    finish(stage_key, reference, teacher)
    duration = time.perf_counter() - started
    expected = fingerprint(reference)
    fresh = 0
    for k in range(kills):
        run_dir = work / f"{stage_key}-fresh{k}"
        run(stage_key, run_dir, teacher, kill_after=rng.uniform(0.3, duration))
        finish(stage_key, run_dir, teacher)
        problem = same(fingerprint(run_dir), expected)
        fresh += problem is None
        log(f"  {stage_key} fresh {k}: {problem or 'identical'}")
    run_dir = work / f"{stage_key}-repeated"
    for k in range(kills):
        if run(stage_key, run_dir, teacher, kill_after=rng.uniform(0.3, duration)) == 0:
            break   # it finished before the kill: the remaining kills land on a finished run
    finish(stage_key, run_dir, teacher)
    problem = same(fingerprint(run_dir), expected)
    log(f"  {stage_key} killed {kills} times: {problem or 'identical'}")
    return fresh, int(problem is None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", default=None, help="keep the run dirs in this folder (default: a temporary one)")
    args = p.parse_args(argv)
    work = Path(args.keep or tempfile.mkdtemp(prefix="kill-matrix-"))
    ok = True
    try:
        for stage_key in args.stages:
            fresh, repeated = matrix(stage_key, args.kills, work, args.seed)
            print(f"{stage_key}: {fresh}/{args.kills} fresh run dirs identical; one run dir killed {args.kills} "
                  f"times: {'identical' if repeated else 'NOT identical'}", flush=True)
            ok &= fresh == args.kills and repeated == 1
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
