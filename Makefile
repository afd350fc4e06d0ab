# Two commands do all set-up on a fresh machine (see README.md):
#   make repro   create .venv, install the pinned stack, fetch CIFAR-10 into data/ (data.dvc),
#                run `dvc repro` (default profile)
#   make test    create .venv, install the pinned stack, run ruff and the tests
# Convenience: make dashboard   the MLflow UI on ./mlflow.db (PORT=5000; Ctrl-C stops it)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true

PORT ?= 5000

.PHONY: venv repro test lint dashboard

$(BIN)/suite: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

venv: $(BIN)/suite

repro: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/suite fetch-data
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

lint: venv
	$(BIN)/ruff check .

test: lint
	PATH="$(CURDIR)/$(BIN):$$PATH" OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -rs; \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

dashboard: venv
	$(BIN)/suite dashboard --port $(PORT)
