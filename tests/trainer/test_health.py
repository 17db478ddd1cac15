"""Non-finite numbers are caught before they reach a checkpoint or an export, and named: the teacher's
pairs, the student's loss or its gradients."""
import math

import pytest
import torch
from safetensors.torch import load_file

from engine.errors import DivergedError
from engine.trainer import Trainer
from engine.trainer.student import safe_load


def tiny_pre(tiny_cfg, **train):
    cfg = tiny_cfg()
    cfg.train.batch_size, cfg.train.total_kimg = 32, 0.64
    cfg.train.checkpoint_every_kimg, cfg.train.log_every_kimg, cfg.train.progress = 0.064, 0.064, False
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def assert_every_file_finite(run_dir):
    for f in (run_dir / "checkpoints").glob("step-*/*.pt"):
        for v in safe_load(f, "cpu")["module"].values():
            assert torch.isfinite(v).all(), f
    export = run_dir / "export" / "network.safetensors"
    if export.is_file():
        assert all(torch.isfinite(v).all() for v in load_file(str(export)).values())


@pytest.mark.parametrize("mode", ["before_step", "deferred"])
def test_a_diverging_run_stops_before_any_file_holds_it(tmp_path, tiny_cfg, mode):
    cfg = tiny_pre(tiny_cfg, nan_check=mode)
    cfg.optim.lr, cfg.optim.betas = 1e30, [0.0, 0.0]      # the first updates overflow the weights
    with pytest.raises(DivergedError, match=r"the (loss|gradients) became non-finite at step \d+ .*before any "
                                            r"checkpoint or export held it: lower optim.lr") as info:
        Trainer(cfg, "pre", tmp_path / "run").fit()
    step = int(str(info.value).split("at step ")[1].split()[0])
    assert step >= 2                                      # it did train, and wrote checkpoints, before
    assert_every_file_finite(tmp_path / "run")
    assert not (tmp_path / "run" / "run.lock").exists()


def test_a_teacher_that_makes_nan_is_named_before_the_first_update(tmp_path, tiny_cfg, export_teacher):
    teacher = export_teacher(tmp_path / "teacher", tiny_cfg())
    with torch.no_grad():
        next(teacher.parameters()).fill_(math.nan)
    from engine.models.weights import export_network
    export_network(teacher, tiny_cfg(), tmp_path / "teacher", meta={"stage": "pre"})
    cfg = tiny_pre(tiny_cfg)
    cfg.mid.teacher, cfg.mid.solver_steps, cfg.mid.loss = str(tmp_path / "teacher"), 4, "l2"
    with pytest.raises(DivergedError, match=r"the prepared inputs became non-finite at step 1 .*the teacher's "
                                            r"pairs .*mid.teacher"):
        Trainer(cfg, "mid", tmp_path / "run").fit()
    assert not list((tmp_path / "run" / "checkpoints").glob("step-*"))
