import os

import pytest
import torch

# DeepSpeed picks its accelerator at import: on these CPU-only machines it must be the CPU one.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Triton kernels run on the CPU through the interpreter; it is read when a kernel is decorated.
os.environ.setdefault("TRITON_INTERPRET", "1")


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
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
