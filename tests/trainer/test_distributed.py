"""Distributed start-up: every rank fails the same way at once (never a rank waiting at a barrier for one
that has failed), and the per-rank micro-batch is checked once."""
import re

import pytest

from engine.config import load_config
from engine.errors import ConfigError
from engine.trainer.distributed import micro_batch_size


def test_a_recipe_mismatch_stops_every_rank_at_once(tmp_path, train_cli, torchrun):
    """The recipe check runs on rank 0 and its error is raised on every rank, before any barrier: both ranks
    exit with the one-line error (a rank left waiting would hang until the process-group timeout, which the
    subprocess timeout of the torchrun fixture turns into a failure)."""
    first = train_cli(tmp_path / "run", "train.total_kimg=0.128")
    assert first.returncode == 0, first.stderr[-2000:]
    res = torchrun(tmp_path / "run", "data.resolution=8", "network.unet.channels=[8,16]", "network.unet.num_blocks=1",
                   "network.unet.attn_resolutions=[]", "train.batch_size=32", "train.total_kimg=0.256",
                   "train.checkpoint_every_kimg=0.128", "train.log_every_kimg=0.064", "train.progress=false",
                   "optim.lr=1e-4", nproc=2, stage="pre", config="digits.yaml", check=False)
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and errors[0] == errors[1], res.stderr[-3000:]
    assert "different config (optim.lr: 0.002 -> 0.0001)" in errors[0]
    # torchrun's own report of the failed ranks is a traceback; the ranks print none
    assert not re.search(r'File "[^"]*/engine/', res.stderr), res.stderr[-3000:]


def test_micro_batch_is_checked_once_with_a_clear_message():
    train = load_config(None, ["train.batch_size=48", "train.grad_accum=2"]).train
    assert micro_batch_size(train, 3) == 8
    with pytest.raises(ConfigError, match=r"train.batch_size=48 must be divisible by the 5 training rank\(s\) x "
                                          r"train.grad_accum=2"):
        micro_batch_size(train, 5)
