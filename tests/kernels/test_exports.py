"""The names ``kernels`` exports: ``from kernels import NAME`` gives the documented object (a function or
class, never a submodule of the same name), whether it is the first import in a fresh process or comes after
every kernels submodule was imported; and the ops run when imported that way."""
import concurrent.futures
import importlib
import importlib.util
import json
import os
import pkgutil
import subprocess
import sys
import types

import pytest
import torch

import kernels
from kernels import dispatch

# What `from kernels import NAME` is checked against, in a fresh process and here.
CHECK = r"""
import importlib, json, sys, types
name = sys.argv[1]
scope = {}
exec(f"from kernels import {name} as obj", scope)
obj = scope["obj"]
import kernels
home = kernels._LAZY.get(name, "kernels.dispatch")
print(json.dumps({"home": home, "is_module": isinstance(obj, types.ModuleType), "callable": callable(obj),
                  "defined_in": getattr(obj, "__module__", None),
                  "identical": obj is getattr(importlib.import_module(home), name)}))
"""


def home_of(name):
    return kernels._LAZY.get(name, "kernels.dispatch")


def expected(name):
    return {"home": home_of(name), "is_module": False, "callable": True, "defined_in": home_of(name),
            "identical": True}


def test_all_lists_the_lazy_names_and_the_dispatch_api():
    assert set(kernels._LAZY) <= set(kernels.__all__) and len(set(kernels.__all__)) == len(kernels.__all__)
    rest = set(kernels.__all__) - set(kernels._LAZY)
    assert rest == {"forced", "implementations_run", "last_implementation", "set_policy"}
    assert all(importlib.util.find_spec(module) is not None for module in set(kernels._LAZY.values()))


def test_from_kernels_import_in_a_fresh_process(root):
    """One fresh interpreter per name: no earlier import in it can have bound a submodule over the name."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
           "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}

    def check(name):
        res = subprocess.run([sys.executable, "-c", CHECK, name], cwd=root, env=env, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, f"{name}: {res.stderr[-2000:]}"
        return json.loads(res.stdout.strip().splitlines()[-1])

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        # the slowest import (diffusers, for the scheduler patch) first, so the others fill in beside it
        order = sorted(kernels.__all__, key=lambda n: (home_of(n) != "kernels.patch.dpm_solver_scheduler",
                                                       n not in kernels._LAZY))
        got = dict(zip(order, pool.map(check, order)))
    assert got == {name: expected(name) for name in kernels.__all__}


def test_from_kernels_import_after_every_submodule_is_imported():
    submodules = [m.name for m in pkgutil.walk_packages(kernels.__path__, "kernels.")]
    assert {"kernels.attention", "kernels.perceptual", "kernels.patch.sdpa"} <= set(submodules)
    for module in submodules:
        importlib.import_module(module)
    for name in kernels.__all__:
        scope = {}
        exec(f"from kernels import {name} as obj", scope)
        obj = scope["obj"]
        assert not isinstance(obj, types.ModuleType), name
        assert obj is getattr(importlib.import_module(home_of(name)), name), name
        assert callable(obj) and obj.__module__ == home_of(name), name
    with pytest.raises(ImportError):
        exec("from kernels import no_such_op", {})


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_jvp_attention_imported_from_kernels_runs(impl):
    from kernels import jvp_attention
    from kernels.attention import attention_reference

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 16, generator=g) for _ in range(3))
    with dispatch.forced("attention", impl):
        out = jvp_attention(q, k, v)
        assert dispatch.last_implementation("attention") == impl
    assert out.shape == q.shape
    torch.testing.assert_close(out, attention_reference(q, k, v), rtol=1e-5, atol=1e-6)
