# `make demo` and `make test` work on a fresh machine: each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev

.PHONY: demo test test-quick lint gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstalls when the package's requirements change; constraints.txt pins torch and torchvision.
$(STAMP): pyproject.toml setup.py constraints.txt | $(PY)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[train,dali,dev]'
	touch $@

demo: $(STAMP)
	$(PY) -m ffsd_fast.train --output-dir runs

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The whole suite (what .ci/run calls), on TEST_WORKERS pytest-xdist workers of one intra-op thread each
# (tests/conftest.py); TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest tests -q -ra --durations=10 -n $(TEST_WORKERS) --dist loadgroup

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PYTEST)

# The edit loop: the suite without the tests marked slow (the end-to-end runs; one short trainer run stays).
test-quick: $(STAMP)
	$(PYTEST) -m "not slow"

# On a GPU machine, with its own python (torch and triton there; nothing is downloaded): the CUDA tests, then the
# kernel sweep, the training-throughput and the data-throughput benchmarks, whose JSON lines land in
# benchmarks/results/. Commit them. DALI is measured when importable there: the lent machines have no internet, so
# its wheels (nvidia-dali-cuda130 and its nvidia-nvimgcodec-cu13 / nvidia-libnvcomp-cu13 dependencies, downloaded
# here with `pip download`) travel split into parts under the 64 MiB a call carries (`split -b 60M`), one part per
# call while the machine stays warm, joined there with `cat` and installed with `pip install --no-deps --target`.
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) -m pip install --quiet --no-deps --no-index --no-build-isolation -e .
	$(GPU_PYTHON) -m pytest tests -q -ra -m cuda
	$(GPU_PYTHON) benchmarks/kernel_sweep.py
	$(GPU_PYTHON) benchmarks/train_throughput.py --device cuda --workload cifar100-resnet32-m2-b128,imagenet-resnet18-m2-b256
	# DALI only where it imports (the lent machines have none unless its wheels were carried there).
	$(GPU_PYTHON) benchmarks/data_throughput.py --device cuda --threads 8 --loader \
		$$($(GPU_PYTHON) -c 'import nvidia.dali' 2>/dev/null && echo dali,torchvision || echo torchvision)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
