# Two commands on a fresh machine: `make demo` and `make test` (each sets up .venv first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN ?= runs/demo
export DS_ACCELERATOR ?= cpu
export MAX_JOBS ?= 2
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
CSRC := $(wildcard csrc/*.h csrc/*.cpp csrc/cuda/*)

.PHONY: setup demo claims claims-meanflow test test-slow test-faults bad-inputs bench compile-check gpu-check clean

setup: $(STAMP)

# torch first (pip takes the machine's cached 2.14.1 wheel), then DeepSpeed without its JIT ops,
# then this package, which compiles csrc/ (the C++ extension always, the CUDA one whenever nvcc is
# found: setup.py's "cmt:" lines say what was built or skipped, and the compiler lines are kept in the
# log); finally DeepSpeed's CPU comm op is built once so the first run does not pay ~40 s.
$(STAMP): setup.py Makefile $(CSRC)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet --no-build-isolation deepspeed==0.19.8
	$(PY) -m pip install -v --no-build-isolation -e '.[dev,dali]' 2>&1 | grep -E '^cmt:|nvcc|c\+\+ |[Ee]rror|Successfully installed'
	$(PY) -c "import torch, kernels._C, kernels._cuda; print('cmt: imported kernels._C and kernels._cuda')"
	$(PY) -c "from engine.trainer.distributed import init_distributed; init_distributed()"
	touch $(STAMP)

demo: setup
	$(PY) -m engine.cli.demo --out $(RUN)

# The initialisation ablation (paper §4.3 at small scale): needs the demo's teacher; ~30 min on 2 cores.
claims: setup
	test -f $(RUN)/pre/export/network.safetensors || $(PY) engine/train.py --stage pre --config configs/digits.yaml --run-dir $(RUN)/pre
	$(PY) -m benchmarks.claims --teacher $(RUN)/pre --out benchmarks/results/claims

# The MeanFlow counterpart: a flow-matching teacher (trained here if absent), MeanFlow-CMT, and MeanFlow
# post-training from CMT / teacher / random init.
claims-meanflow: setup
	test -f $(RUN)/fm-pre/export/network.safetensors || $(PY) engine/train.py --stage pre --config configs/digits_fm.yaml --run-dir $(RUN)/fm-pre
	$(PY) -m benchmarks.claims --form meanflow --teacher $(RUN)/fm-pre --out benchmarks/results/claims_meanflow

test: setup
	$(PY) -m pytest -q -m "not slow and not gpu" tests

# Tests marked slow (minutes each). pytest exits 5 when none are collected, which is not a failure here.
test-slow: setup
	$(PY) -m pytest -q -m slow tests || [ $$? -eq 5 ]

# The kill matrix (docs/reliability.md): SIGKILL every stage variant at random moments, restart, compare with
# an uninterrupted run; prints k/10 identical per stage (~25 min on 2 cores).
test-faults: setup
	$(PY) -m tools.kill_matrix

# docs/bad-inputs.md: every known bad input through the real commands (exit code and message).
bad-inputs: setup
	$(PY) -m tools.bad_inputs

# The benchmarks page (benchmarks/results/README.md): cost per pair, per-stage profiles, kernel counts.
# Triton kernels run (and are counted) through the interpreter on CPU machines.
BENCH := benchmarks/results
bench: setup
	rm -f $(BENCH)/profile.csv
	$(PY) -m benchmarks.cost_per_pair --out $(BENCH)/cost_per_pair
	$(PY) -m benchmarks.profile --stage pre --config configs/digits.yaml --csv $(BENCH)/profile.csv
	$(PY) -m benchmarks.profile --stage post --config configs/digits_meanflow.yaml --set post.init=random --csv $(BENCH)/profile.csv
	TRITON_INTERPRET=1 $(PY) -m benchmarks.kernel_dpm_solver_step --out $(BENCH)/kernels
	TRITON_INTERPRET=1 $(PY) -m benchmarks.kernel_jvp_attention --out $(BENCH)/kernels
	$(PY) -m benchmarks.feature_distance --out $(BENCH)/kernels
	$(PY) -m benchmarks.pipeline --out $(BENCH)/pipeline
	$(PY) -m benchmarks.compile_kernels --out $(BENCH)/kernels
	$(PY) -m benchmarks.report --results $(BENCH)

# Every Triton kernel built for sm_90 by Triton's bundled ptxas at its launch configs, no GPU: fails on fp16/bf16 spills.
compile-check: setup
	$(PY) -m benchmarks.compile_kernels --out $(BENCH)/kernels

# On one CUDA GPU (≤ 8 min on an H100/H200): the kernel tests marked gpu, compiled (not the interpreter), then
# fused-vs-eager timings against the device's peak; writes $(BENCH)/gpu/<device>.csv and .md. Without CUDA it
# says so in one line and exits 0. `python -m benchmarks.gpu_check --quick` is a ~2-minute subset.
gpu-check: setup
	$(PY) -m benchmarks.gpu_check --out $(BENCH)/gpu

clean:
	rm -rf $(VENV) runs build *.egg-info kernels/*.so
