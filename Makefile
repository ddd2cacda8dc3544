# `make demo` and `make test` work on a fresh machine: each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev

.PHONY: demo test lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstalls when the package's requirements change; constraints.txt pins torch and torchvision.
$(STAMP): setup.py constraints.txt | $(PY)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(PY) -m ffsd_fast.train --output-dir runs

lint: $(STAMP)
	$(PY) -m ruff check .

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest tests -q -ra --durations=10

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
