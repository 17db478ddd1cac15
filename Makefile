# Two commands on a fresh machine: `make demo` and `make test` (each sets up .venv first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN ?= runs/demo
export DS_ACCELERATOR ?= cpu

.PHONY: setup demo claims test test-slow bench clean

setup: $(STAMP)

# torch first (pip takes the machine's cached 2.14.1 wheel), then DeepSpeed without its JIT ops,
# then this package; finally DeepSpeed's CPU comm op is built once so the first run does not pay ~40 s.
$(STAMP): setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet --no-build-isolation deepspeed==0.19.8
	$(PY) -m pip install --quiet --no-build-isolation -e '.[dev]'
	$(PY) -c "from engine.trainer import init_distributed; init_distributed()"
	touch $(STAMP)

demo: setup
	$(PY) -m engine.demo --out $(RUN)

# The initialisation ablation (issue #3): needs the demo's teacher; ~30 min on 2 cores.
claims: setup
	test -f $(RUN)/pre/export/network.safetensors || $(PY) engine/train.py --stage pre --config configs/digits.yaml --run-dir $(RUN)/pre
	$(PY) -m benchmarks.claims --teacher $(RUN)/pre --out benchmarks/results/claims

test: setup
	$(PY) -m pytest -q -m "not slow" tests

# Tests marked slow (minutes each). pytest exits 5 when none are collected, which is not a failure here.
test-slow: setup
	$(PY) -m pytest -q -m slow tests || [ $$? -eq 5 ]

bench: setup
	@echo "make bench: no benchmarks yet (they arrive with issues #4, #5, #8)" >&2; exit 2

clean:
	rm -rf $(VENV) runs build *.egg-info
