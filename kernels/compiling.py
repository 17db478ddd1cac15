"""Compile the Triton kernels for a GPU that is not here, and read what ptxas made of them.

Why: nothing in this repository runs on a GPU in CI, yet a kernel that spills registers or asks for more
shared memory than an SM has fails (or crawls) only there. ``triton.compile`` needs no driver for a
``GPUTarget``, so each kernel module lists the launches it would make (``compile_specs()``, a list of
:class:`CompileSpec`) and :func:`compile_for_sm` builds each one for sm_90 with Triton's bundled ptxas:
registers, spills, stack and shared memory come from the real cubin, not from a guess.

A kernel defined under ``TRITON_INTERPRET=1`` is an interpreter object that ``triton.compile`` cannot take
(and helper ``@triton.jit`` functions it calls are interpreter objects too): compile in a process without
that variable — ``python -m benchmarks.compile_kernels`` does. This module never imports ``engine``.
"""
from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

# The modules of kernels/ that define @triton.jit kernels; each may define compile_specs().
KERNEL_MODULES = ("kernels.dpm_solver_step", "kernels.attention")
# Shared memory one block may use on sm_90 (227 KB, opt-in via cudaFuncAttributeMaxDynamicSharedMemorySize).
SM90_MAX_SHARED = 232_448
MAX_REGISTERS = 255


@dataclass(frozen=True)
class CompileSpec:
    """One launch as a launcher would make it: the kernel, its specialization and its launch options."""
    name: str                    # e.g. "attention fwd d=72 bf16 N=1024"
    fn: object                   # the @triton.jit function
    signature: dict              # ASTSource signature: {"X": "*fp16", "n": "i32", "B": "constexpr", ...}
    constexprs: dict             # values of the constexpr params (by name)
    num_warps: int
    num_stages: int
    io_dtype: torch.dtype        # the kernel's IO dtype: spills are an error for float16/bfloat16
    attrs: dict = field(default_factory=dict)   # {(arg index,): [["tt.divisibility", 16]]}, see launch_specialization


@dataclass(frozen=True)
class Pointer:
    """A tensor argument as Triton's launch specialization sees it: a dtype and whether its address is
    16-byte aligned (fresh torch CUDA allocations are 512-byte aligned; views at an offset may not be)."""
    dtype: torch.dtype
    aligned: bool = True

    def data_ptr(self) -> int:
        return 256 if self.aligned else 8


def _python_fn(fn):
    return getattr(fn, "fn", fn)          # JITFunction and InterpretedFunction both keep the function as .fn


def arg_names(fn) -> list[str]:
    return list(inspect.signature(_python_fn(fn)).parameters)


def launch_specialization(fn, args: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) that a launch of ``fn`` with ``args`` (every parameter by name; tensors
    as :class:`Pointer` or real tensors) compiles, by Triton's own rule (``JITFunction._pack_args``): ints
    equal to 1 become constexprs, ints divisible by 16 and 16-byte aligned pointers get
    ``tt.divisibility=16`` — which is what lets masked loads vectorise.

    Triton 3.8's ASTSource takes attrs keyed by argument *path* (``(index,)``, a tuple), each a list of
    ``[name, value]`` pairs; ``BaseBackend.parse_attr("D")`` gives ``[["tt.divisibility", 16]]``.
    """
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    names = arg_names(fn)
    if set(args) != set(names):
        raise ValueError(f"{_python_fn(fn).__name__}: args must name every parameter; missing "
                         f"{sorted(set(names) - set(args))}, unknown {sorted(set(args) - set(names))}")
    params = inspect.signature(_python_fn(fn)).parameters
    no_spec = {p.num for p in getattr(fn, "params", ()) if p.do_not_specialize}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if "constexpr" in str(params[name].annotation):
            signature[name], constexprs[name] = "constexpr", args[name]
            continue
        ty, spec = native_specialize_impl(BaseBackend, args[name], False, i not in no_spec, True)
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = spec
        elif isinstance(spec, str) and BaseBackend.parse_attr(spec):
            attrs[(i,)] = BaseBackend.parse_attr(spec)
    return signature, constexprs, attrs


def _attrs_for_ast(spec: CompileSpec) -> dict:
    """spec.attrs in ASTSource's form; names and the runtime's letter code ("D") are accepted too."""
    from triton.backends.compiler import BaseBackend

    names = arg_names(spec.fn)
    out = {}
    for key, value in spec.attrs.items():
        path = (names.index(key),) if isinstance(key, str) else tuple(key)
        out[path] = BaseBackend.parse_attr(value) if isinstance(value, str) else value
    return out


def _ptxas(arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(arch).path


def tool_versions(arch: int = 90) -> dict:
    """Triton's version and the ptxas it compiles ``arch`` with (path and release), for report headers."""
    import triton
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    ptxas = _ptxas(arch)
    text = subprocess.run([ptxas, "--version"], capture_output=True, text=True, check=True).stdout
    release = re.search(r"release [\d.]+, V([\d.]+)", text)
    return {"triton": triton.__version__, "ptxas": release.group(1) if release else text.strip().splitlines()[-1],
            "ptxas_path": ptxas, "gpu_name": sm_arch_from_capability(arch)}


def _spills(ptx: str, arch: int, fp_fusion: bool) -> dict:
    """Registers and spill bytes from ``ptxas -v`` run with the flags of Triton's make_cubin (cuobjdump does
    not report spills; the register count ties this rerun to Triton's own cubin)."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [_ptxas(arch), "-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(Path(tmp) / "kernel.o")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    found = [re.search(p, log) for p in (r"Used (\d+) registers", r"(\d+) bytes spill stores", r"(\d+) bytes spill loads")]
    if not all(found):
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    return dict(zip(("registers", "spill_stores", "spill_loads"), (int(m.group(1)) for m in found)))


def _cubin_usage(cubin: bytes, arch: int) -> dict:
    """Registers, stack and static shared memory of the cubin Triton produced (cuobjdump -res-usage)."""
    cuobjdump = str(Path(_ptxas(arch)).with_name("cuobjdump"))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", out)
    if m is None or out.count("REG:") != 1:
        raise RuntimeError(f"expected one function in the cubin:\n{out}")
    return dict(zip(("registers", "stack", "shared_static"), map(int, m.groups())))


def compile_for_sm(spec: CompileSpec, arch: int = 90) -> dict:
    """Compile ``spec`` for sm_``arch`` (no GPU needed) and return what the cubin uses.

    Keys: name, kernel, dtype, num_warps, num_stages, registers, spill_stores, spill_loads (bytes), stack
    (bytes), shared_static (the cubin's), shared_dynamic (Triton's ``metadata.shared``, what the launch asks
    for), shared (their sum), cp_async, wgmma (bool), vector_loads (count of ld.global.v2/v4 in the PTX).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    if not isinstance(spec.fn, JITFunction):
        raise TypeError(f"{spec.name}: {type(spec.fn).__name__} is not a JITFunction (was the kernel defined "
                        "under TRITON_INTERPRET=1?); compile in a process without it: python -m benchmarks.compile_kernels")
    src = ASTSource(spec.fn, spec.signature, spec.constexprs, _attrs_for_ast(spec))
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    ptx = compiled.asm["ptx"]
    usage = _cubin_usage(compiled.asm["cubin"], arch)
    spills = _spills(ptx, arch, compiled.metadata.enable_fp_fusion)
    if spills["registers"] != usage["registers"]:
        raise RuntimeError(f"{spec.name}: ptxas -v rerun used {spills['registers']} registers, Triton's cubin "
                           f"{usage['registers']}: the flags no longer match Triton's make_cubin")
    dynamic = int(compiled.metadata.shared)
    return {"name": spec.name, "kernel": _python_fn(spec.fn).__name__,
            "dtype": str(spec.io_dtype).removeprefix("torch."), "num_warps": spec.num_warps,
            "num_stages": spec.num_stages, "registers": usage["registers"], "spill_stores": spills["spill_stores"],
            "spill_loads": spills["spill_loads"], "stack": usage["stack"], "shared_static": usage["shared_static"],
            "shared_dynamic": dynamic, "shared": usage["shared_static"] + dynamic, "cp_async": "cp.async" in ptx,
            "wgmma": "wgmma" in ptx, "vector_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v[24]\b", ptx))}


def spills_are_errors(dtype: torch.dtype | str) -> bool:
    """16-bit IO kernels must not spill (their tiles are sized for registers); fp32 ones are reported."""
    return str(dtype).removeprefix("torch.") in ("float16", "bfloat16")


def specs_by_module(modules=KERNEL_MODULES) -> dict[str, list[CompileSpec] | None]:
    """{module: its compile_specs(), or None where the module defines none (yet)}."""
    out = {}
    for name in modules:
        module = importlib.import_module(name)
        make = getattr(module, "compile_specs", None)
        out[name] = list(make()) if make is not None else None
    return out


def all_compile_specs(modules=KERNEL_MODULES) -> list[CompileSpec]:
    return [s for specs in specs_by_module(modules).values() for s in specs or ()]
