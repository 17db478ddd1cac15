"""Install the `engine` and `kernels` packages and build the csrc/ extensions.

torch and DeepSpeed are pinned here but installed first by the Makefile (torch from the machine's wheel
cache, DeepSpeed with DS_BUILD_OPS=0 and no build isolation), so `pip install -e .` finds them present —
which the extensions need: they compile against the installed torch.

Extensions (both register ops in the ``cmt_csrc`` torch.library namespace; kernels/feature_distance.py
loads them and falls back to its PyTorch reference without them):
- ``kernels._C``: the op schemas and the CPU kernels (C++/OpenMP). Built whenever torch is importable.
- ``kernels._cuda``: the CUDA kernels. Built when torch has CUDA (``torch.version.cuda``) and nvcc with
  the CUDA headers is found (``CUDA_HOME``/``CUDA_PATH``, else nvcc on PATH, else /usr/local/cuda). It
  imports on a machine without a GPU or driver; running it needs a GPU.

Environment:
- ``CMT_CUDA_ARCHS`` (default ``8.0;9.0+PTX``): GPU architectures, ``;``/``,``/space separated. Each
  becomes ``-gencode arch=compute_XY,code=sm_XY``; ``+PTX`` also embeds compute_XY PTX, which the driver
  JIT-compiles on newer GPUs (the default's 9.0 PTX lets sm_100/sm_120 Blackwell GPUs load the extension).
- ``MAX_JOBS``: parallel compile jobs (ninja), as in torch.utils.cpp_extension.
- ``CMT_SKIP_CUDA_BUILD=1``: build only the CPU extension.
- ``CMT_FORCE_CUDA_BUILD=1``: fail instead of skipping when the CUDA extension cannot be built.
Every decision is printed as a ``cmt:`` line so CI logs show what was built and why.
"""
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup


def log(message: str) -> None:
    print(f"cmt: {message}", file=sys.stderr, flush=True)


def flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def find_cuda_home():
    """The CUDA toolkit root: a directory with bin/nvcc and include/cuda_runtime.h.

    nvcc on PATH may be a wrapper script (as /usr/local/bin/nvcc is on this project's machines), so its
    parent is only one candidate; torch's own guess would take /usr/local and miss the headers."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += [str(Path(nvcc).resolve().parent.parent), str(Path(nvcc).parent.parent)]
    candidates.append("/usr/local/cuda")
    for home in filter(None, candidates):
        if (Path(home) / "bin" / "nvcc").is_file() and (Path(home) / "include" / "cuda_runtime.h").is_file():
            return str(Path(home).resolve())
    return None


# sm_80 (A100) and sm_90 (H100) SASS, plus compute_90 PTX for GPUs newer than the toolkit's SASS targets.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def cuda_arch_flags(spec: str) -> tuple[list[str], list[str]]:
    """('8.0;9.0+PTX') -> (nvcc -gencode flags, ['sm_80', 'sm_90+PTX'])."""
    flags, names = [], []
    for item in spec.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        arch, ptx = (item[:-4], True) if item.upper().endswith("+PTX") else (item, False)
        number = arch.replace(".", "")
        if not number.isdigit():
            raise SystemExit(f"cmt: CMT_CUDA_ARCHS entry {item!r} is not like 8.0, 9.0 or 9.0+PTX")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
        names.append(f"sm_{number}" + ("+PTX" if ptx else ""))
    if not flags:
        raise SystemExit(f"cmt: CMT_CUDA_ARCHS is empty; set e.g. CMT_CUDA_ARCHS='{DEFAULT_CUDA_ARCHS}'")
    return flags, names


def extensions():
    """(ext_modules, cmdclass) for the csrc/ extensions, or ([], {}) when torch is not importable."""
    force_cuda = flag("CMT_FORCE_CUDA_BUILD")
    try:
        import torch
    except ImportError:
        if force_cuda:
            raise SystemExit("cmt: CMT_FORCE_CUDA_BUILD=1 but torch is not importable at build time: install "
                             "torch first, then `pip install --no-build-isolation -e .`")
        log("torch is not importable at build time: skipping the csrc/ extensions (install torch first, then "
            "`pip install --no-build-isolation -e .`); kernels.feature_distance will use its PyTorch reference")
        return [], {}

    reason = None
    cuda_home = None
    if flag("CMT_SKIP_CUDA_BUILD"):
        reason = "CMT_SKIP_CUDA_BUILD=1"
    elif torch.version.cuda is None:
        reason = f"torch {torch.__version__} was built without CUDA"
    else:
        cuda_home = find_cuda_home()
        if cuda_home is None:
            reason = "no CUDA toolkit found (set CUDA_HOME to a directory with bin/nvcc and include/)"
    if reason and force_cuda:
        raise SystemExit(f"cmt: CMT_FORCE_CUDA_BUILD=1 but the CUDA extension cannot be built: {reason}")
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home   # read by torch.utils.cpp_extension at import

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cxx = ["-O3", "-fopenmp"]   # torch.utils.cpp_extension adds -std=c++20, which torch 2.14 headers need
    modules = [CppExtension("kernels._C", ["csrc/feature_distance_cpu.cpp"],
                            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]
    log(f"building CPU extension kernels._C (C++/OpenMP) against torch {torch.__version__}")
    if reason:
        log(f"skipping the CUDA extension kernels._cuda: {reason}")
    else:
        gencode, names = cuda_arch_flags(os.environ.get("CMT_CUDA_ARCHS", DEFAULT_CUDA_ARCHS))
        log(f"building CUDA extension kernels._cuda for {', '.join(names)} with {cuda_home}/bin/nvcc "
            f"(CUDA {torch.version.cuda} torch; MAX_JOBS={os.environ.get('MAX_JOBS', 'unset')})")
        modules.append(CUDAExtension(
            "kernels._cuda", ["csrc/cuda/feature_distance_cuda.cpp", "csrc/cuda/feature_distance_kernel.cu"],
            extra_compile_args={"cxx": ["-O3"],
                                "nvcc": ["-O3", "-lineinfo", *gencode]}))
    return modules, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="cmt-engine",
    version="0.1.0",
    description="Kernel-accelerated training engine for Consistency Mid-Training (CMT)",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": [
        "cmt-train = engine.cli.train:main",
        "cmt-sample = engine.cli.sample:main",
        "cmt-evaluate = engine.cli.evaluate:main",
        "cmt-plan = engine.cli.plan:main",
        "cmt-plot = engine.cli.plot:main",
        "cmt-demo = engine.cli.demo:main",
        "cmt-latents = engine.cli.latents:main",
        "cmt-import-weights = engine.cli.import_weights:main",
        "cmt-train-feature-net = engine.cli.train_feature_net:main",
        "cmt-prepare = engine.cli.prepare:main",
    ]},
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "deepspeed==0.19.8",
        "numpy>=1.26",
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "scikit-learn>=1.4",
        "scipy>=1.11",
        "pillow>=10.0",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "lpips==0.1.4",
        "tensorboard==2.21.0",        # scalars beside log.jsonl
        "timm==1.0.31",               # DINOv2 ViT-L/14 for FD_DINOv2 (weights from a local file)
        "torch-fidelity==0.4.0",      # the TF-exact Inception-v3 of FID (weights from a local file)
        "pybind11>=2.12",
        "ninja>=1.11",
    ],
    extras_require={
        "dev": ["pytest>=8.0", "diffusers==0.42.1", "pytorch-fid==0.3.0"],   # pytorch-fid: a test oracle
        "dali": ["nvidia-dali-cuda130==2.4.0"],
    },
)
