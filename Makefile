# Two entry points (see README.md): `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STUDY ?= studies/protocol_ablation.yaml
PYTEST_ARGS ?=

.PHONY: setup run test clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Stamps make reruns instant; they are redone when pyproject.toml or constraints.txt
# changes (constraints.txt pins the torch pair and Ray the tests run).
$(VENV)/.setup: pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install -q -c constraints.txt -e .
	touch $@

$(VENV)/.setup-dev: pyproject.toml constraints.txt $(VENV)/.setup
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

setup: $(VENV)/.setup

run: setup
	$(PY) -m orchestrator run $(STUDY)

test: $(VENV)/.setup-dev
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf results .pytest_cache
