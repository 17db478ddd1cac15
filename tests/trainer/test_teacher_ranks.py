"""Dedicated teacher ranks (mid.pipeline=teacher_ranks): pairs sent to the student ranks are the serial ones.

- The wire protocol (engine/trainer/teacher_ranks.py serve_pairs / RemoteProducer) in one process: a gloo group of two
  ranks on a HashStore, the teacher in a thread. Pairs arrive bit-identical to the serial prepare, each
  once and in order; a failing teacher is an error at the student, not a hang.
- End to end, 1 teacher rank + 1 student rank (`torchrun engine/train.py`) against one process running
  serially with the same global batch and grad_accum: losses, grad norms, counters and the exported EMA
  weights are bit-identical (the student does the same arithmetic on the same pairs; the pairs are made
  by the same code from the same generator in another process).
- A teacher rank that raises ends the run with its error (spawned processes, joined with a timeout).
"""
import datetime
import json
import multiprocessing
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from engine.stages.mid import MidTraining
from engine.stages.pairs import TrajectoryPairs
from engine.trainer.batches import MicroJob, step_seed
from engine.trainer.producers import preparer
from engine.trainer.teacher_ranks import RemoteProducer, recv_message, serve_pairs

PAIR_TENSORS = ("x", "t", "target", "level", "target_level", "trajectory")


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return tiny_teacher


@pytest.fixture(scope="session")
def jobs(digits_batch):
    return lambda n: [MicroJob(step=k, micro=0, seed=step_seed(0, k, 0), batch=digits_batch(16, seed=k))
                      for k in range(n)]


def gloo_pair():
    store = torch.distributed.HashStore()
    timeout = datetime.timedelta(seconds=30)
    groups = [None, None]

    def make(rank):
        groups[rank] = torch.distributed.ProcessGroupGloo(store, rank, 2, timeout)
    threads = [threading.Thread(target=make, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads], [t.join() for t in threads]
    return groups            # rank 0: the student, rank 1: the teacher


def run_teacher(group, plan, make, depth, errors):
    try:
        serve_pairs(group, iter(plan), make, depth=depth, students=[0])
    except BaseException as error:  # noqa: BLE001
        errors.append(error)


@pytest.mark.parametrize("depth", [1, 3])
def test_sent_pairs_equal_serial_pairs_each_once_in_order(teacher, depth, mid_cfg, jobs):
    stage = MidTraining(mid_cfg(teacher))
    make = preparer(stage, torch.device("cpu"))
    expected = [make(job) for job in jobs(5)]
    student, teacher_group = gloo_pair()
    errors = []
    thread = threading.Thread(target=run_teacher, args=(teacher_group, [(0, j) for j in jobs(5)], make, depth, errors))
    thread.start()
    producer = RemoteProducer(iter(jobs(5)), student, src=1, build=TrajectoryPairs)
    got = [next(producer) for _ in range(5)]
    thread.join(timeout=30)
    assert not thread.is_alive() and not errors
    assert [g.job.step for g in got] == list(range(5))
    for e, g in zip(expected, got):
        assert isinstance(g.prepared, TrajectoryPairs) and g.seconds > 0
        for name in PAIR_TENSORS:
            assert torch.equal(getattr(e, name), getattr(g.prepared, name)), name
        assert (g.prepared.teacher_nfe, g.prepared.num_trajectories, g.prepared.r, g.prepared.labels) == \
               (e.teacher_nfe, e.num_trajectories, e.r, e.labels)


def test_a_pair_stream_out_of_step_is_an_error(jobs):
    student, teacher_group = gloo_pair()
    make = lambda job: TrajectoryPairs(*(torch.zeros(2) for _ in range(6)))  # noqa: E731
    thread = threading.Thread(target=run_teacher, args=(teacher_group, [(0, j) for j in jobs(3)[1:]], make, 2, []))
    thread.start()
    producer = RemoteProducer(iter(jobs(3)), student, src=1, build=TrajectoryPairs)
    with pytest.raises(RuntimeError, match="out of step"):
        next(producer)
    with pytest.raises(RuntimeError, match="failed earlier"):
        next(producer)
    recv_message(student, 1)                         # take what the teacher sent, so its thread ends
    thread.join(timeout=30)


def test_a_failing_teacher_is_an_error_at_the_student(jobs):
    student, teacher_group = gloo_pair()

    def make(job):
        if job.step == 2:
            raise ValueError("teacher exploded")
        return TrajectoryPairs(*(torch.full((2,), float(job.step)) for _ in range(6)))
    errors = []
    thread = threading.Thread(target=run_teacher, args=(teacher_group, [(0, j) for j in jobs(4)], make, 2, errors))
    thread.start()
    producer = RemoteProducer(iter(jobs(4)), student, src=1, build=TrajectoryPairs)
    assert [next(producer).prepared.x[0].item() for _ in range(2)] == [0.0, 1.0]
    with pytest.raises(RuntimeError, match=r"teacher rank 1 failed while making the pairs of step 2, "
                                           r"micro-step 0: ValueError: teacher exploded"):
        next(producer)
    thread.join(timeout=30)
    assert not thread.is_alive() and [type(e) for e in errors] == [ValueError]


@pytest.fixture(scope="module")
def serial(tmp_path_factory, teacher, run_mid):
    """One process, pairs made in line, grad_accum=2: 6 steps of 32 pairs."""
    return run_mid(tmp_path_factory.mktemp("serial") / "run", teacher, "train.grad_accum=2")


def assert_same_run(run, serial, resumed_at=0):
    """Same log (the work counters included: they travel in the checkpoints) and exported weights, also after a
    resume at step ``resumed_at``."""
    (rows, weights), (serial_rows, serial_weights) = run, serial
    keys = ("step", "loss", "lr", "grad_norm", "pairs", "teacher_nfe", "trajectories")
    assert [[r[k] for k in keys] for r in rows] == [[r[k] for k in keys] for r in serial_rows]
    # every pair once, counted when used
    assert [r["pairs"] for r in rows] == [32 * k for k in range(1, 7)]
    assert weights.keys() == serial_weights.keys()
    assert all(torch.equal(weights[k], serial_weights[k]) for k in weights)


RANKS = ["train.grad_accum=2", "mid.pipeline=teacher_ranks", "mid.teacher_ranks=1", "mid.pipeline_depth=2"]


def test_teacher_ranks_training_is_bit_identical_to_one_serial_process(tmp_path, teacher, serial, run_mid):
    """2 processes (1 teacher rank, 1 student rank) vs 1 process, both grad_accum=2."""
    assert_same_run(run_mid(tmp_path / "ranks", teacher, *RANKS, nproc=2), serial)
    # checkpoints and logs were written by the student only, under the student world
    assert sorted(p.name for p in (tmp_path / "ranks" / "checkpoints").glob("step-*")) == ["step-00000006"]


@pytest.mark.slow
def test_teacher_ranks_resume_from_the_checkpointed_step(tmp_path, teacher, serial, run_mid):
    """Rewind a finished run to its step-3 checkpoint and run it again: the teacher rank restarts at step 3."""
    run_dir, every = tmp_path / "ranks", ["train.checkpoint_every_kimg=0.096", "train.keep_checkpoints=2"]
    run_mid(run_dir, teacher, *RANKS, *every, nproc=2)
    (run_dir / "checkpoints" / "latest.json").write_text(json.dumps({"tag": "step-00000003", "step": 3, "nimg": 96}))
    shutil.rmtree(run_dir / "checkpoints" / "step-00000006")
    shutil.rmtree(run_dir / "export")
    assert_same_run(run_mid(run_dir, teacher, *RANKS, *every, nproc=2), serial, resumed_at=3)


def _rank_main(rank, port, config, overrides, run_dir, out_dir):
    """One process of a 2-process world; the teacher rank's network fails on its 10th call (step 1)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from engine.config import load_config
    from engine.trainer import Trainer

    try:
        trainer = Trainer(load_config(config, overrides), "mid", run_dir)
        if trainer.world.role == "teacher":
            forward, calls = trainer.stage.teacher.forward, iter(range(10**9))

            def fails_on_call_10(*args):
                if next(calls) == 10:      # 4 calls per rollout, 2 rollouts per step: step 1, micro-step 0
                    raise RuntimeError("teacher broke on call 10")
                return forward(*args)
            trainer.stage.teacher.forward = fails_on_call_10
        trainer.fit()
        Path(out_dir, f"rank{rank}").write_text("finished")
    except BaseException as error:  # noqa: BLE001
        Path(out_dir, f"rank{rank}").write_text(f"{type(error).__name__}: {error}")
        raise


def test_a_failing_teacher_rank_stops_the_run_with_its_error(tmp_path, teacher, root, free_port,
                                                            tiny_mid_overrides):
    overrides = [*tiny_mid_overrides, f"mid.teacher={teacher}", "train.grad_accum=2", "mid.pipeline=teacher_ranks"]
    ctx, port, config = multiprocessing.get_context("spawn"), free_port(), str(root / "configs" / "digits_cmt.yaml")
    procs = [ctx.Process(target=_rank_main, args=(r, port, config, overrides, str(tmp_path / "run"), str(tmp_path)))
             for r in (0, 1)]
    [p.start() for p in procs]
    for p in procs:
        p.join(timeout=120)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, "a rank hung after the teacher rank failed"
    assert [p.exitcode != 0 for p in procs] == [True, True]
    assert (tmp_path / "rank1").read_text() == "RuntimeError: teacher broke on call 10"
    assert (tmp_path / "rank0").read_text() == (
        "RuntimeError: teacher rank 1 failed while making the pairs of step 1, micro-step 0: RuntimeError: teacher "
        "broke on call 10 (mid.pipeline=teacher_ranks; its own log has the traceback)")


def test_messages_carry_json_not_pickles():
    from engine.trainer.teacher_ranks import MSG_PAIRS, send_message

    class Recorder:
        def __init__(self):
            self.sent = []

        def send(self, tensors, dst, tag):
            self.sent.append(tensors[0])

    group = Recorder()
    send_message(group, 1, MSG_PAIRS, {"step": 3, "values": {"teacher_nfe": 4}}, {"x": torch.ones(2, 3)})
    header, blob, x = group.sent
    assert header.tolist() == [MSG_PAIRS, blob.numel()]
    assert json.loads(bytes(blob.tolist())) == {"step": 3, "values": {"teacher_nfe": 4},
                                                "tensors": {"x": [[2, 3], "float32"]}}


def test_a_silent_teacher_rank_is_a_stall_not_a_hang(jobs):
    from engine.errors import StalledError

    student, _ = gloo_pair()
    producer = RemoteProducer(iter(jobs(2)), student, src=1, build=TrajectoryPairs, timeout_s=1.0)
    with pytest.raises(StalledError, match=r"teacher rank 1 sent nothing for 1 s.*step 0, micro-step 0 was due"):
        next(producer)
