# make test: create .venv, install requirements, run the test suite (offline; uses DATA_DIR for real MNIST).
# make demo: the same set-up, then the collection's headline experiment at a small size (about a minute on 2 cores):
#   grad_collect.py on 10,000 images with 10% of the labels flipped, then label_audit.py on that run (who finds the
#   flipped labels: the default ranking, TracIn self-influence, the loss); prints where the plots are.
# make ablations: train_mlp's ablations (init, dropout, lr schedule, batch norm) x 3 seeds as one sweep, then the
#   table and which differences exceed the seed noise (report.py ablations; a few minutes on 2 cores).
# make reproduce-quick / make reproduce: every source's headline claim measured -> REPRODUCE.md (report.py reproduce;
#   quick: CPU settings, about 10 minutes on 2 cores (REPRODUCE.md's first line says how long it took); full: the
#   sources' settings, hours).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA_DIR ?= ./data
export DATA_DIR

.PHONY: test demo bench ablations reproduce reproduce-quick clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# The tests mostly start small training processes; two pytest workers with one OpenMP thread each use both
# cores better than one worker with two threads (356 s against 562 s for the whole suite on 2 cores).
TEST_WORKERS ?= 2
test: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS)

demo: $(VENV)/.installed
	$(PY) grad_collect.py --limit 10000 --label-noise 0.1 --epochs 3 --tsne-samples 500 --tag demo --quiet
	$(PY) label_audit.py $$(ls -d runs/grad_collect/*-demo* | tail -n 1) --tag demo --quiet
	@echo "plots: $$(ls -d runs/grad_collect/*-demo* | tail -n 1)/*.png $$(ls -d runs/label_audit/*-demo* | tail -n 1)/*.png"

ablations: $(VENV)/.installed
	$(PY) report.py ablations --data-dir $(DATA_DIR)

reproduce: $(VENV)/.installed
	$(PY) report.py reproduce --full --data-dir $(DATA_DIR)

reproduce-quick: $(VENV)/.installed
	$(PY) report.py reproduce --quick --data-dir $(DATA_DIR)

bench: $(VENV)/.installed
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
