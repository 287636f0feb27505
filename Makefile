# Two commands set up everything on a fresh machine with only Python:
#   make demo   create .venv, install torch + the project, train the tiny model on synthetic data
#   make test   same set-up, then the whole test suite
#
# Bring your own torch: either install it into $(VENV) first (any build, e.g. CUDA) - an importable
# torch is never replaced - or name it: make demo TORCH_SPEC="torch==2.9.1 --index-url URL".
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# pytest worker processes (pytest-xdist); the suite's tests are single-threaded, so 2 workers use
# both cores of a 2-core CI machine, one torch thread each (OMP_NUM_THREADS, unless set).
# TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
BIN := $(VENV)/bin
STAMP := $(VENV)/.blip-installed

.PHONY: demo test lint install clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "using the torch already in $(VENV): $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	else \
		$(BIN)/python -m pip install --quiet $(TORCH_SPEC); \
	fi
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/blip run blip_pretrain --config debug job.output_dir=outputs/demo-$$(date +%Y%m%d-%H%M%S)
	@echo "blip is $(BIN)/blip (not on PATH): run it as $(BIN)/blip, or '. $(BIN)/activate' first"

test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean-venv:
	rm -rf $(VENV)
