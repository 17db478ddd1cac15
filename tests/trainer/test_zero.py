"""ZeRO 1/2/3 with two processes (gloo, torchrun) against one process on the same global batch.

The same for MeanFlow post-training, whose loss differentiates the student with torch.func.jvp: ZeRO-2 and
ZeRO-3 in the default suite, 0 and 1 marked slow.

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


def assert_same_steps(run, ref, counter):
    """Losses, clipped gradient norms, weights and each rank's half of ``counter`` equal the reference's."""
    rows, weights = run
    ref_rows, ref_weights = ref
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == list(range(1, 7))
    torch.testing.assert_close([r["loss"] for r in rows], [r["loss"] for r in ref_rows], rtol=1e-5, atol=0)
    assert all(r["grad_norm"] > 0.05 for r in ref_rows), "clipping is not active: lower optim.grad_clip"
    torch.testing.assert_close([r["grad_norm"] for r in rows], [r["grad_norm"] for r in ref_rows], rtol=1e-4, atol=0)
    assert [r[counter] for r in rows] == [r[counter] // 2 for r in ref_rows] and ref_rows[-1][counter] > 0
    assert weights.keys() == ref_weights.keys()
    for k in weights:
        torch.testing.assert_close(weights[k], ref_weights[k], rtol=0, atol=1e-5, msg=k)


def assert_same_run(run, ref, teacher):
    assert_same_steps(run, ref, "pairs")
    # the student started as the teacher (mid.init=teacher); its EMA has moved away from it
    weights, start = run[1], load_file(str(Path(teacher) / "network.safetensors"))
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


@pytest.fixture(scope="module")
def meanflow_reference(tmp_path_factory, run_meanflow):
    """One process, ZeRO-0, MeanFlow post-training with the chunking of 2 processes at grad_accum=1."""
    return run_meanflow(tmp_path_factory.mktemp("meanflow") / "ref", "train.grad_accum=2")


@pytest.mark.parametrize("zero", [
    pytest.param(0, marks=pytest.mark.slow), pytest.param(1, marks=pytest.mark.slow), 2, 3])
def test_meanflow_two_processes_match_one_process(tmp_path, meanflow_reference, run_meanflow, zero):
    """MeanFlow's torch.func.jvp with 2 processes: ZeRO-2 shards the gradients the jvp's backward produces;
    ZeRO-3 runs the jvp as a functional call on gathered parameters (engine/trainer/student.py), and its
    gradients are reduce-scattered into the shards. Losses, clipped gradient norms and weights equal one
    process's."""
    run = run_meanflow(tmp_path / f"z{zero}", f"train.zero_stage={zero}", nproc=2)
    assert_same_steps(run, meanflow_reference, "jvp")
    assert meanflow_reference[0][-1]["jvp"] == 12                        # one jvp per micro-step
