# Two entry points, each setting up its own virtual environment on first use:
#   make demo   the main job on the embedded offline digits dataset (writes runs/digits)
#   make test   lint, format check and the test suite
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.run: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[plots]"
	touch $@

$(VENV)/.test: $(VENV)/.run
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

RUN := runs/digits

.PHONY: demo test
# Pretrain on the embedded digits (resumes if interrupted), sample, then probe every layer.
demo: $(VENV)/.run
	$(PY) scripts/train.py --config=configs/digits.py --workdir=$(RUN)
	$(PY) scripts/sample.py --model=$(RUN) --out=$(RUN)/samples.png --num=36
	$(PY) scripts/probe.py --config=configs/probe.py --config.init_from=$(RUN) --workdir=$(RUN)/probe

test: $(VENV)/.test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	GLIBC_TUNABLES=glibc.malloc.hugetlb=1 $(PY) -m pytest -q  # igpt/runtime.py: the entry points set it themselves
