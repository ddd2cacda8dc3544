# `make demo` and `make test` work on a fresh machine: each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev

.PHONY: demo test test-quick lint gpu-check gpu-wheels clean

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

# On a GPU machine, with its own python (torch and triton there; nothing is downloaded): benchmarks/gpu_check.py, one
# command sized for a 15-minute lease (done within 6 minutes on an H100/H200). It runs the CUDA tests, the trainer
# end to end, the throughput ablation, the kernel sweep and a profile of the captured step, each stage with its own
# time budget, writes JSON lines under benchmarks/results/ (logs under benchmarks/results/logs/) and prints a summary
# table last. CONTRIBUTING.md ("make gpu-check") says how to prepare and bring back a run.
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) -m pip install --quiet --no-deps --no-index --no-build-isolation -e .
	$(GPU_PYTHON) benchmarks/gpu_check.py

# Here, with internet: DALI's wheels for the GPU machine (its Python 3.12 on x86-64 lacks DALI and these requirements
# of it; six, numpy, packaging and pyyaml are there), split into parts of at most 60 MiB and packed into folders
# .gpu-wheels/call-N/ of at most 60 MiB each (a call carries 64 MiB, the tree included), each with SHA256SUMS of the
# whole wheels. Carry one folder per call; gpu_check.py joins, checks and installs them there (CONTRIBUTING.md).
GPU_WHEELS := .gpu-wheels
DALI_WHEELS := nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-libnvcomp-cu13==5.3.0.16 \
	nvidia-nvjpeg==13.3.2.43 nvidia-nvjpeg2k-cu13==0.11.0.51 nvidia-nvtiff-cu13==0.8.0.82 astunparse==1.6.3 \
	gast==0.7.0 libcst==1.9.0 makefun==1.16.0 nvtx==0.2.17 optree==0.20.0
WHEEL_PLATFORMS := $(foreach v,2_17 2_27 2_28 2_31 2_34 2_35,--platform manylinux_$(v)_x86_64) \
	--platform manylinux2014_x86_64
gpu-wheels:
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)/whole
	# --no-deps per wheel: the list above is the closure, less what the GPU machine has.
	for w in $(DALI_WHEELS); do \
		$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
			$(WHEEL_PLATFORMS) -d $(GPU_WHEELS)/whole $$w || exit 1; \
	done
	cd $(GPU_WHEELS)/whole && sha256sum *.whl > ../SHA256SUMS && for w in *.whl; do split -b 60M $$w ../$$w.part-; done
	rm -rf $(GPU_WHEELS)/whole
	# Largest first, into the current folder while it stays within 60 MiB, else into the next.
	cd $(GPU_WHEELS) && n=1 && used=0 && for f in $$(ls -S *.part-*); do \
		size=$$(stat -c %s $$f); \
		if [ $$((used + size)) -gt 62914560 ]; then n=$$((n + 1)); used=0; fi; \
		mkdir -p call-$$n && mv $$f call-$$n/ && cp SHA256SUMS call-$$n/ && used=$$((used + size)); \
	done && rm SHA256SUMS
	du -sh $(GPU_WHEELS)/call-*

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
