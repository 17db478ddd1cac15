"""The pipelined rollout (engine/trainer/producers.py): same pairs as serial, each exactly once, errors not hangs."""
import itertools
import json
import random
import threading

import numpy as np
import pytest
import torch

from engine.config import ConfigError
from engine.stages.mid import MidTraining
from engine.trainer import Trainer
from engine.trainer.batches import MicroJob, step_seed
from engine.trainer.producers import SerialProducer, ThreadedProducer, preparer
from kernels import dispatch


@pytest.fixture
def teacher(tmp_path, export_teacher, tiny_cfg):
    export_teacher(tmp_path / "teacher", tiny_cfg())
    return tmp_path / "teacher"


@pytest.fixture
def jobs(digits_batch):
    """jobs(n=None): jobs with distinct batches and seeds, as the trainer makes them (n=None: forever)."""
    def make(n=None):
        for k in (itertools.count() if n is None else range(n)):
            yield MicroJob(step=k, micro=0, seed=step_seed(0, k, 0), batch=digits_batch(16, seed=k))
    return make


def maker(stage):
    return preparer(stage, torch.device("cpu"))


def test_prepare_draws_only_from_its_generator(teacher, mid_cfg, digits_batch):
    """A producer thread runs the stage's prepare while the student's dropout draws from the global RNG."""
    stage = MidTraining(mid_cfg(teacher))
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    stage.prepare(digits_batch(16), torch.Generator().manual_seed(2))
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1] and np.array_equal(np.random.get_state()[1], before[2])


@pytest.mark.parametrize("depth", [1, 3])
def test_threaded_pairs_equal_serial_pairs_each_once_in_order(teacher, depth, mid_cfg, jobs):
    stage = MidTraining(mid_cfg(teacher))
    with SerialProducer(jobs(), maker(stage)) as serial:
        expected = [next(serial) for _ in range(6)]
    with ThreadedProducer(jobs(), maker(stage), depth=depth) as threaded:
        got = [next(threaded) for _ in range(6)]
    assert [g.job.step for g in got] == list(range(6))          # none lost, none twice, in order
    for e, g in zip(expected, got):
        for name in ("x", "t", "target", "level", "trajectory"):
            assert torch.equal(getattr(e.prepared, name), getattr(g.prepared, name)), name
        assert g.seconds > 0
    assert stage.counters["pairs"] == 0                         # counted when the student uses them
    assert not any(t.name == "pair-producer" for t in threading.enumerate())


def test_producer_error_is_raised_at_its_job_and_stops_the_thread(teacher, mid_cfg, jobs):
    stage = MidTraining(mid_cfg(teacher))
    make = maker(stage)

    def fails_on_job_3(job):
        if job.step == 3:
            raise ValueError("teacher exploded")
        return make(job)

    producer = ThreadedProducer(jobs(), fails_on_job_3, depth=2)
    assert [next(producer).job.step for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="teacher exploded") as info:
        next(producer)
    assert "pair producer while making the pairs of step 3, micro-step 0" in " ".join(info.value.__notes__)
    assert not any(t.name == "pair-producer" for t in threading.enumerate())
    with pytest.raises(RuntimeError, match="failed earlier"):
        next(producer)


def test_a_finished_job_stream_is_an_error_not_a_hang(jobs):
    producer = ThreadedProducer(jobs(2), lambda job: job.step, depth=4)
    assert [next(producer).prepared for _ in range(2)] == [0, 1]
    with pytest.raises(RuntimeError, match="job stream of the pair producer ended"):
        next(producer)


def test_closing_early_stops_a_producer_blocked_on_a_full_buffer(jobs):
    with ThreadedProducer(jobs(), lambda job: job.step, depth=1) as producer:
        assert next(producer).prepared == 0     # the producer now fills the buffer and blocks on the next put
    assert not any(t.name == "pair-producer" for t in threading.enumerate())


@pytest.fixture
def train(mid_cfg):
    """train(tmp_path, teacher, name, **mid) -> Trainer: 4 steps of 16 pairs, 2 micro-steps each."""
    return lambda tmp_path, teacher, name, **mid: _trainer(mid_cfg(teacher, **mid), tmp_path / name)


def _trainer(cfg, run_dir):
    cfg.train.total_kimg = 0.064              # 4 steps of 16 pairs
    cfg.train.grad_accum = 2
    cfg.train.log_every_kimg = 0.016
    cfg.train.checkpoint_every_kimg = 1
    cfg.train.progress = False
    return Trainer(cfg, "mid", run_dir)


def log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_pipelined_training_is_bit_identical_to_serial(tmp_path, teacher, train):
    runs = {}
    for mode in ("serial", "thread"):
        trainer = train(tmp_path, teacher, mode, pipeline=mode, pipeline_depth=3)
        trainer.fit()
        runs[mode] = log(tmp_path / mode), trainer.student.ema.state_dict()
    (serial_log, serial_ema), (piped_log, piped_ema) = runs["serial"], runs["thread"]
    keys = ("step", "loss", "lr", "grad_norm", "pairs", "teacher_nfe", "trajectories")
    assert [[r[k] for k in keys] for r in piped_log] == [[r[k] for k in keys] for r in serial_log]
    assert len(serial_log) == 4 and serial_log[-1]["pairs"] == 64     # consumed pairs only
    assert all(torch.equal(serial_ema[k], piped_ema[k]) for k in serial_ema)


def test_a_failing_teacher_stops_pipelined_training_with_its_error(tmp_path, teacher, train):
    trainer = train(tmp_path, teacher, "fail", pipeline="thread")
    forward, calls = trainer.stage.teacher.forward, itertools.count()

    def fails_on_call_10(*args):
        if next(calls) == 10:                # rollouts take 4 calls: the third micro-step's rollout
            raise RuntimeError("teacher broke on call 10")
        return forward(*args)

    trainer.stage.teacher.forward = fails_on_call_10
    with pytest.raises(RuntimeError, match="teacher broke on call 10") as info:
        trainer.fit()
    assert "step 1, micro-step 0" in " ".join(info.value.__notes__)
    assert not any(t.name == "pair-producer" for t in threading.enumerate())


def test_bad_pipeline_depth_is_refused(tmp_path, teacher, train):
    with pytest.raises(ConfigError, match="mid.pipeline_depth=0"):
        train(tmp_path, teacher, "bad", pipeline="thread", pipeline_depth=0)


def test_the_producer_thread_runs_with_the_kernels_forced_where_it_was_made(jobs):
    """dispatch.forced is per thread: the engine hands the forcing of the thread that made the producer
    to the producer's thread, so `with kernels.forced(...)` around training also governs the pairs."""
    seen = lambda job: dispatch.policy("dpm_solver_step")   # noqa: E731
    with dispatch.forced("dpm_solver_step", "torch"):
        with ThreadedProducer(jobs(), seen, depth=1) as producer:
            assert next(producer).prepared == "torch"
    with ThreadedProducer(jobs(), seen, depth=1) as producer:
        assert next(producer).prepared == dispatch.policy("dpm_solver_step")


def test_a_stuck_producer_stops_training_with_one_line_naming_the_step(jobs):
    from engine.errors import StalledError

    stuck = threading.Event()

    def make(job):
        if job.step == 2:
            stuck.wait()                 # a teacher that never returns
        return job.step

    producer = ThreadedProducer(jobs(), make, depth=1, timeout_s=1.0)
    assert [next(producer).prepared for _ in range(2)] == [0, 1]
    with pytest.raises(StalledError, match=r"delivered nothing for 1 s \(it is making step 2, micro-step 0\).*"
                                           r"mid.producer_timeout_s"):
        next(producer)
    stuck.set()
    producer.close()


@pytest.mark.parametrize("exit_", [SystemExit(), SystemExit(3), KeyboardInterrupt()])
def test_system_exit_in_the_producer_surfaces_with_its_message(jobs, exit_):
    def make(job):
        raise exit_

    with pytest.raises(RuntimeError, match=f"the pair producer stopped with {type(exit_).__name__}") as info:
        next(ThreadedProducer(jobs(), make, depth=1))
    assert "raised in the pipelined pair producer while making the pairs of step 0" in " ".join(info.value.__notes__)
