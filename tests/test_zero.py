"""ZeRO 1/2/3 with two processes (gloo, torchrun) against one process on the same global batch.

The trainer seeds each chunk of a step's global batch by its index (m·world + rank), so one process with
grad_accum=2G draws exactly the chunks that two processes with grad_accum=G draw: the runs differ only in
where the gradient sums happen. In fp32 on CPU that changes the last bits of each step (allreduce vs
accumulation order), which Adam carries forward; over 6 steps we see ~1e-7 relative, and allow 1e-5 on
losses and 1e-5 absolute on the exported EMA weights. Gradient clipping is set below the gradient norm,
so the clipped step (a global norm across shards and ranks) is what is compared.

Two-process runs launch the CLI (`torchrun engine/train.py`), ~20–40 s each on 2 busy cores:
the ZeRO-3 case (sharded parameters, EMA gathered for the update, the pipelined producer) runs by default,
the others are marked slow.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.config import ConfigError, load_config
from engine.trainer import check_scale_out
from test_mid import export_teacher, tiny_cfg

ROOT = Path(__file__).resolve().parents[1]
# 6 steps of 32 pairs (4-step rollouts: 4 pairs per trajectory), dropout on, clipping active.
TINY_MID = ["data.resolution=8", "network.unet.channels=[8,16]", "network.unet.num_blocks=1",
            "network.unet.attn_resolutions=[]", "network.dropout=0.2", "mid.solver_steps=4", "mid.loss=l2",
            "mid.data_start=true", "optim.name=adam", "optim.lr=2e-3", "optim.grad_clip=0.05", "train.batch_size=32", "train.total_kimg=0.192",
            "train.checkpoint_every_kimg=1", "train.log_every_kimg=0.032", "train.progress=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_mid(run_dir, teacher, *overrides, nproc=1):
    """Mid-training in `nproc` fresh processes (`torchrun engine/train.py`), the reference run included:
    an in-process run would inherit whatever earlier tests left in this process (DeepSpeed's ZeRO-3 patches
    F.linear process-wide, for one), and bit-identical comparisons then fail."""
    overrides = [*TINY_MID, f"mid.teacher={teacher}", *overrides]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), str(ROOT / "engine" / "train.py"),
           "--stage", "mid", "--config", str(ROOT / "configs" / "digits_cmt.yaml"), "--run-dir", str(run_dir)]
    for o in overrides:
        cmd += ["--set", o]
    # Without the world of one an in-process run left in os.environ: torchrun sets the ranks itself.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return read_run(run_dir)


def read_run(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
    return rows, load_file(str(Path(run_dir) / "export" / "network.safetensors"))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "export"
    export_teacher(path, tiny_cfg())
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher):
    """reference(accum, *overrides): one process, ZeRO-0, the chunking of 2 processes with grad_accum=accum/2."""
    out, runs = tmp_path_factory.mktemp("reference"), {}

    def get(accum, *overrides):
        key = (accum, *overrides)
        if key not in runs:
            runs[key] = run_mid(out / f"run{len(runs)}", teacher, f"train.grad_accum={accum}", *overrides)
        return runs[key]
    return get


def assert_same_run(run, ref, teacher):
    rows, weights = run
    ref_rows, ref_weights = ref
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == list(range(1, 7))
    torch.testing.assert_close([r["loss"] for r in rows], [r["loss"] for r in ref_rows], rtol=1e-5, atol=0)
    assert all(r["grad_norm"] > 0.05 for r in ref_rows), "clipping is not active: lower optim.grad_clip"
    torch.testing.assert_close([r["grad_norm"] for r in rows], [r["grad_norm"] for r in ref_rows], rtol=1e-4, atol=0)
    assert [r["pairs"] for r in rows] == [r["pairs"] // 2 for r in ref_rows]   # each rank counts its half
    assert weights.keys() == ref_weights.keys()
    for k in weights:
        torch.testing.assert_close(weights[k], ref_weights[k], rtol=0, atol=1e-5, msg=k)
    # the student started as the teacher (mid.init=teacher); its EMA has moved away from it
    start = load_file(str(Path(teacher) / "network.safetensors"))
    assert max((weights[k] - start[k]).abs().max().item() for k in weights) > 1e-3


def test_zero3_two_processes_match_one_process(tmp_path, teacher, reference):
    run = run_mid(tmp_path / "z3", teacher, "train.zero_stage=3", "train.grad_accum=1", "mid.pipeline=thread",
                  nproc=2)
    assert_same_run(run, reference(2), teacher)


@pytest.mark.slow
@pytest.mark.parametrize("zero,accum,optim", [(1, 1, "radam"), (2, 1, "adam"), (2, 2, "adam"), (3, 2, "adam")])
def test_zero_two_processes_match_one_process(tmp_path, teacher, reference, zero, accum, optim):
    """RAdam: DeepSpeed vets ZeRO's client optimizers by class; the trainer allows any elementwise one.
    (RAdam's first steps are plain momentum steps of lr·m: a larger lr lets its 6 steps move the weights.)"""
    optim = [f"optim.name={optim}", "optim.lr=0.05" if optim == "radam" else "optim.lr=2e-3"]
    run = run_mid(tmp_path / f"z{zero}", teacher, f"train.zero_stage={zero}", f"train.grad_accum={accum}",
                  *optim, nproc=2)
    assert_same_run(run, reference(2 * accum, *optim), teacher)


@pytest.mark.parametrize("source", ["train.zero_stage=3", f"train.deepspeed_config={ROOT}/configs/deepspeed/zero3.json"])
def test_meanflow_post_training_is_refused_under_zero3(source):
    """torch.func.jvp cannot trace ZeRO-3's parameter gathering: refused before any process group starts."""
    cfg = load_config(ROOT / "configs" / "digits_meanflow.yaml", [source])
    with pytest.raises(ConfigError, match=r"post.method=meanflow .*torch.func.jvp.*ZeRO-3.*use ZeRO 0, 1 or 2"):
        check_scale_out(cfg, "post")
    check_scale_out(cfg, "mid")                                        # no jvp in mid-training
    check_scale_out(load_config(ROOT / "configs" / "digits_meanflow.yaml", ["train.zero_stage=2"]), "post")
