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
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.config import ConfigError, load_config
from engine.trainer import Trainer


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return tiny_teacher


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher, run_mid):
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


def test_zero3_two_processes_match_one_process(tmp_path, teacher, reference, run_mid):
    run = run_mid(tmp_path / "z3", teacher, "train.zero_stage=3", "train.grad_accum=1", "mid.pipeline=thread",
                  nproc=2)
    assert_same_run(run, reference(2), teacher)


@pytest.mark.slow
@pytest.mark.parametrize("zero,accum,optim", [(1, 1, "radam"), (2, 1, "adam"), (2, 2, "adam"), (3, 2, "adam")])
def test_zero_two_processes_match_one_process(tmp_path, teacher, reference, run_mid, zero, accum, optim):
    """RAdam: DeepSpeed vets ZeRO's client optimizers by class; the trainer allows any elementwise one.
    (RAdam's first steps are plain momentum steps of lr·m: a larger lr lets its 6 steps move the weights.)"""
    optim = [f"optim.name={optim}", "optim.lr=0.05" if optim == "radam" else "optim.lr=2e-3"]
    run = run_mid(tmp_path / f"z{zero}", teacher, f"train.zero_stage={zero}", f"train.grad_accum={accum}",
                  *optim, nproc=2)
    assert_same_run(run, reference(2 * accum, *optim), teacher)


@pytest.mark.parametrize("source", ["train.zero_stage=3", "train.deepspeed_config={root}/configs/deepspeed/zero3.json"])
def test_meanflow_post_training_is_refused_under_zero3(source, root, tmp_path, monkeypatch):
    """torch.func.jvp cannot trace ZeRO-3's parameter gathering: refused before any process group starts."""
    import engine.trainer.loop as loop

    def no_launch(pipeline):
        raise AssertionError("the process group was started")
    monkeypatch.setattr(loop, "launch", no_launch)
    overrides = [source.format(root=root), "post.init=random", "data.resolution=8", "network.unet.channels=[8,16]",
                 "network.unet.num_blocks=1", "network.unet.attn_resolutions=[]"]
    cfg = load_config(root / "configs" / "digits_meanflow.yaml", overrides)
    with pytest.raises(ConfigError, match=r"post.method=meanflow .*torch.func.jvp.*ZeRO-3.*use ZeRO 0, 1 or 2"):
        Trainer(cfg, "post", tmp_path / "run")
    cfg.post.method = "ect"                                              # no jvp: it gets as far as the launch
    cfg.network.use_r = False
    with pytest.raises(AssertionError, match="process group was started"):
        Trainer(cfg, "post", tmp_path / "run")
