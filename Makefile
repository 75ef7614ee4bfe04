# Two entry points, each setting up its own virtual environment on first use:
#   make demo   the main job on the embedded offline digits dataset
#   make test   lint, format check and the test suite
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.run: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.test: $(VENV)/.run
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

.PHONY: demo test
demo: $(VENV)/.run
	$(PY) scripts/demo.py

test: $(VENV)/.test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q
