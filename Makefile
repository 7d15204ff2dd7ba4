# make test: create .venv, install requirements, run the test suite (offline; uses DATA_DIR for real MNIST).
# make demo: the same set-up, then a 2-epoch MLP run; prints where its plots are.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA_DIR ?= ./data
export DATA_DIR

.PHONY: test demo bench clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q

demo: $(VENV)/.installed
	$(PY) train_mlp.py --epochs 2 --tag demo
	@echo "plots: $$(ls -d runs/train_mlp/*-demo* | tail -n 1)/*.png"

bench: $(VENV)/.installed
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
