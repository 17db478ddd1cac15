"""Fixtures shared by the test tree (which mirrors the package tree). No test module imports another:
what several need lives here, as fixtures (the session-scoped ones hand out plain functions)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# DeepSpeed picks its accelerator at import: on these CPU-only machines it must be the CPU one.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Triton kernels run on the CPU through the interpreter; it is read when a kernel is decorated.
os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# Pre-training in seconds: a tiny U-Net on 8x8 digits, 20 steps of 32 images, a checkpoint every 4 steps.
TINY = ["data.resolution=8", "network.unet.channels=[8,16]", "network.unet.num_blocks=1",
        "network.unet.attn_resolutions=[]", "train.batch_size=32", "train.total_kimg=0.64",
        "train.checkpoint_every_kimg=0.128", "train.log_every_kimg=0.064", "train.progress=false"]
# Mid-training: 6 steps of 32 pairs (4-step rollouts: 4 pairs per trajectory), dropout on, clipping active.
TINY_MID = ["data.resolution=8", "network.unet.channels=[8,16]", "network.unet.num_blocks=1",
            "network.unet.attn_resolutions=[]", "network.dropout=0.2", "mid.solver_steps=4", "mid.loss=l2",
            "mid.data_start=true", "optim.name=adam", "optim.lr=2e-3", "optim.grad_clip=0.05",
            "train.batch_size=32", "train.total_kimg=0.192", "train.checkpoint_every_kimg=1",
            "train.log_every_kimg=0.032", "train.progress=false"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests use tiny tensors, where OpenMP synchronisation costs more than it saves — up to ~100x on a
    2-core machine that is also running something else. Subprocess tests set their own threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_inherited_rendezvous(monkeypatch):
    """A test that started DeepSpeed in-process leaves RANK/MASTER_PORT in os.environ (a plain-python run
    becomes a world of one that way); a CLI subprocess inheriting them would try to bind that same port."""
    for var in RENDEZVOUS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    return _free_port


# --------------------------------------------------------------------------------------------------
# Networks and configs
# --------------------------------------------------------------------------------------------------
def _randomize(module, std=0.2, seed=0):
    """Zero-initialised residual branches, gates and output layers hide most of a network at init:
    give every parameter seeded random values so tests see the whole network."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


@pytest.fixture(scope="session")
def randomize():
    return _randomize


def _tiny_cfg(kind="edm", use_r=False, num_classes=0):
    from engine.config import Config

    cfg = Config()
    cfg.data.resolution = 8
    cfg.model.kind = kind
    cfg.network.unet.channels = [8, 16]
    cfg.network.unet.num_blocks = 1
    cfg.network.unet.attn_resolutions = []
    cfg.network.use_r = use_r
    cfg.network.num_classes = num_classes
    return cfg


@pytest.fixture(scope="session")
def tiny_cfg():
    """tiny_cfg(kind="edm", use_r=False, num_classes=0): a Config for a tiny U-Net on 8x8 digits."""
    return _tiny_cfg


def _export_teacher(path, cfg, seed=0, stage="pre"):
    """Export a seeded network of ``cfg`` whose zero-initialised layers are made non-zero (so outputs depend
    on inputs) as if ``stage`` had trained it; returns the raw network."""
    from engine.models.factory import build_raw_network
    from engine.models.weights import export_network

    torch.manual_seed(seed)
    net = build_raw_network(cfg)
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    export_network(net, cfg, path, meta={"stage": stage})
    return net


@pytest.fixture(scope="session")
def export_teacher():
    """export_teacher(path, cfg, seed=0, stage="pre") -> raw network."""
    return _export_teacher


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """An exported tiny EDM teacher (its export dir), shared by the tests that only read it."""
    path = tmp_path_factory.mktemp("teacher") / "export"
    _export_teacher(path, _tiny_cfg())
    return path


def _digits_batch(n, seed=0, labels=False):
    g = torch.Generator().manual_seed(seed)
    out = {"images": torch.rand(n, 1, 8, 8, generator=g) * 2 - 1}
    if labels:
        out["labels"] = torch.randint(0, 10, (n,), generator=g)
    return out


@pytest.fixture(scope="session")
def digits_batch():
    """digits_batch(n, seed=0, labels=False): a seeded batch shaped like the tiny configs' data."""
    return _digits_batch


def _mid_cfg(teacher, **mid):
    """Mid-training of the tiny U-Net with dropout (the global RNG), 4-step data-started rollouts, 16 pairs."""
    cfg = _tiny_cfg()
    cfg.network.dropout = 0.2
    cfg.mid.teacher = str(teacher)
    cfg.mid.solver_steps = 4
    cfg.mid.data_start = True
    cfg.train.batch_size = 16
    for k, v in mid.items():
        setattr(cfg.mid, k, v)
    return cfg


@pytest.fixture(scope="session")
def mid_cfg():
    """mid_cfg(teacher, **mid_overrides): a tiny mid-training Config."""
    return _mid_cfg


# --------------------------------------------------------------------------------------------------
# Runs in fresh processes, as users start them
# --------------------------------------------------------------------------------------------------
def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    env.update(DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", **extra)
    return env


def _train_cli(run_dir, *overrides, stage="pre", config="digits.yaml", wait=True):
    """`python engine/train.py` with the TINY overrides (then ``overrides``); a Popen when not ``wait``."""
    cmd = [sys.executable, str(ROOT / "engine" / "train.py"), "--stage", stage, "--config",
           str(ROOT / "configs" / config), "--run-dir", str(run_dir)]
    for o in [*TINY, *overrides]:
        cmd += ["--set", o]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_clean_env())
    return subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(), timeout=600)


@pytest.fixture(scope="session")
def train_cli():
    """train_cli(run_dir, *overrides, stage="pre", config="digits.yaml", wait=True): the CLI on TINY settings."""
    return _train_cli


def _torchrun(run_dir, *overrides, nproc=1, stage="mid", config="digits_cmt.yaml", check=True):
    """`torchrun --nproc_per_node nproc engine/train.py` with ``overrides``: (CompletedProcess)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), str(ROOT / "engine" / "train.py"),
           "--stage", stage, "--config", str(ROOT / "configs" / config), "--run-dir", str(run_dir)]
    for o in overrides:
        cmd += ["--set", o]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(OMP_NUM_THREADS="1"), timeout=900)
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="session")
def torchrun():
    return _torchrun


def read_run(run_dir):
    from safetensors.torch import load_file

    rows = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
    return rows, load_file(str(Path(run_dir) / "export" / "network.safetensors"))


@pytest.fixture(scope="session")
def run_mid():
    """run_mid(run_dir, teacher, *overrides, nproc=1) -> (log rows, exported weights): TINY_MID mid-training
    in fresh processes (the reference run too: an in-process run would inherit whatever earlier tests left
    in this process — DeepSpeed's ZeRO-3 patches F.linear process-wide, for one)."""
    def run(run_dir, teacher, *overrides, nproc=1):
        _torchrun(run_dir, *TINY_MID, f"mid.teacher={teacher}", *overrides, nproc=nproc)
        return read_run(run_dir)
    return run


# MeanFlow post-training (torch.func.jvp through the student) at the size of TINY_MID, from random weights.
TINY_MEANFLOW = ["post.init=random", "data.resolution=8", "network.unet.channels=[8,16]", "network.unet.num_blocks=1",
                 "network.unet.attn_resolutions=[]", "network.dropout=0.2", "optim.lr=2e-3", "optim.grad_clip=0.05",
                 "train.batch_size=32", "train.total_kimg=0.192", "train.checkpoint_every_kimg=1",
                 "train.log_every_kimg=0.032", "train.progress=false"]


@pytest.fixture(scope="session")
def run_meanflow():
    """run_meanflow(run_dir, *overrides, nproc=1) -> (log rows, exported weights), in fresh processes."""
    def run(run_dir, *overrides, nproc=1):
        _torchrun(run_dir, *TINY_MEANFLOW, *overrides, nproc=nproc, stage="post", config="digits_meanflow.yaml")
        return read_run(run_dir)
    return run


@pytest.fixture(scope="session")
def tiny_mid_overrides():
    return list(TINY_MID)
