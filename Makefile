# Two commands on a fresh machine: `make demo` and `make test` (each sets up .venv when needed).
PYTHON ?= python3
# torch threads for `make demo` (per process) and `make test` (per worker); 0 = the cores free when the command
# starts, shared by the demo's processes (the demo's embedded targets: one per process)
THREADS ?= 0
VENV ?= .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.side-extract-installed

.PHONY: demo test test-slow install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: 2.13.0 is the CPU build pip takes from local disk here; pyproject's range accepts it,
	# so nothing pulls a multi-GB CUDA build afterwards.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# processes for `make demo`: two where the machine has two cores or more (the sharded stages, sampling and every
# method's generations, split between them; the demo's classifiers are trained by the main process alone, so every
# figure is the one-process run's); PROCESSES=1 runs it in one process
PROCESSES ?= $(shell [ "$$(nproc 2>/dev/null || echo 1)" -ge 2 ] && echo 2 || echo 1)
demo: $(STAMP)
	$(BIN)/side --threads $(THREADS) --processes $(PROCESSES) demo --out runs/demo

# one pytest-xdist worker per core (-n auto); each test file runs whole on one worker, so a module's fixtures are made
# once (--dist loadfile); WORKERS=0 runs the suite in this process
WORKERS ?= auto
test: $(STAMP)
	SIDE_THREADS=$(THREADS) $(BIN)/python -m pytest -q -rs -n $(WORKERS) --dist loadfile

test-slow: $(STAMP)
	SIDE_THREADS=$(THREADS) $(BIN)/python -m pytest -q -m slow

clean:
	rm -rf runs/demo .pytest_cache
