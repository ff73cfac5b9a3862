# Quickstart: `make demo` then `make test`. Both install into .venv on first use.
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo demo-data bench clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: install
	OMP_NUM_THREADS=2 $(PYTHON) -m pytest -q tests

demo-data: install
	$(PYTHON) -m furnace.data.demo

demo: install
	$(PYTHON) -m furnace.data.demo
	cd exp_demo && ../$(PYTHON) train.py && ../$(PYTHON) eval.py -e last -s
	@echo "demo done: composites (input | prediction | ground truth | variance) in" \
	      "exp_demo/log/pred_imgs/epoch-last/, logs in exp_demo/log/ (train_*.log, val_last.log, tb/)"

bench: install
	$(PYTHON) bench/losses.py
	$(PYTHON) bench/train_step.py
	$(PYTHON) bench/eval.py

clean:
	rm -rf .pytest_cache exp_*/log
