# Two entry points, each setting up its own virtual environment on first use:
#   make demo   the main job on the embedded offline digits dataset (writes runs/digits)
#   make test   lint, format check and the test suite
# and a long research run, not part of either (about 3 hours on 2 CPU cores):
#   make fashion   the paper's findings on real Fashion-MNIST (writes runs/fashion)
#   make fashion OBJECTIVE=bert   the same with the BERT objective (writes runs/fashion-bert)
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

.PHONY: demo test fashion tpu-compiler test-tpu
# Pretrain on the embedded digits (resumes if interrupted), sample, then probe every layer.
demo: $(VENV)/.run
	$(PY) scripts/train.py --config=configs/digits.py --workdir=$(RUN)
	$(PY) scripts/sample.py --model=$(RUN) --out=$(RUN)/samples.png --num=36
	$(PY) scripts/probe.py --config=configs/probe.py --config.init_from=$(RUN) --workdir=$(RUN)/probe

# The tests run with malloc's tunables as the entry points set them, on one worker per core
# (pytest-xdist), each taking whole files so that a module's fixtures are built once. The suite
# is mostly single-threaded compilation and process start-up: on 2 cores it took 11 min 47 s
# so, against 16-19 min in one process. At most 4 workers: one process running the whole
# suite held about 3 GB.
test: $(VENV)/.test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	GLIBC_TUNABLES=$$($(PY) -c "import igpt.runtime as r; print(r.TUNABLES)") \
	  $(PY) -m pytest -q -n auto --maxprocesses=4 --dist loadfile

# The TPU compiler (libtpu, the version jax names for its tpu extra), beside the venv and not
# in it: importable, it makes every JAX process on a CPU machine look for a TPU and warn.
TPU_LIB := $(VENV)/libtpu
$(TPU_LIB)/.done: $(VENV)/.test
	$(VENV)/bin/pip install --quiet --no-deps --target $(TPU_LIB) "$$($(PY) -c "import importlib.metadata as m; print(next(r.split(';')[0] for r in m.requires('jax') if r.startswith('libtpu')))")"
	touch $@
tpu-compiler: $(TPU_LIB)/.done

# The sharding checks compiled for TPU slices (tests/test_sharding.py), on this CPU machine.
test-tpu: $(TPU_LIB)/.done
	PYTHONPATH=$(TPU_LIB) $(PY) -c "import libtpu"
	PYTHONPATH=$(TPU_LIB) $(PY) -m pytest -q tests/test_sharding.py -k tpu

OBJECTIVE ?= ar
FASHION := runs/fashion$(if $(filter bert,$(OBJECTIVE)),-bert)
FASHION_DIR ?= /usr/share/datasets/fashion-mnist
FASHION_ARG := dir=$(FASHION_DIR)

# Pretrain at 14x14, probe every layer (all labels, then 10 and 100 per class, 5 subsets each),
# fine-tune with the rate searched on validation; each stage resumes if interrupted.
fashion: $(VENV)/.run
	@test -f $(FASHION_DIR)/train-images-idx3-ubyte.gz || \
	  (command -v apt-get >/dev/null && apt-get install -y dataset-fashion-mnist) || \
	  (echo "Fashion-MNIST is not in $(FASHION_DIR): put the four IDX files there" \
	        "(https://github.com/zalandoresearch/fashion-mnist), or set FASHION_DIR=..."; exit 1)
	$(PY) scripts/train.py --config=configs/fashion_mnist.py:$(FASHION_ARG),objective=$(OBJECTIVE) \
	  --workdir=$(FASHION)/pretrain
	$(PY) scripts/probe.py --config=configs/fashion_mnist.py:task=probe,$(FASHION_ARG) \
	  --config.init_from=$(FASHION)/pretrain --workdir=$(FASHION)/probe
	for n in 10 100; do $(PY) scripts/probe.py \
	  --config=configs/fashion_mnist.py:task=probe,$(FASHION_ARG),labels_per_class=$$n \
	  --config.init_from=$(FASHION)/pretrain --config.features_dir=$(FASHION)/probe/features \
	  --workdir=$(FASHION)/probe$$n || exit 1; done
	$(PY) scripts/finetune.py --config=configs/fashion_mnist.py:task=finetune,$(FASHION_ARG) \
	  --config.init_from=$(FASHION)/pretrain --workdir=$(FASHION)/finetune
