# One entry point for developers and CI. `make serve` and `make test` work on a
# fresh machine: they create .venv and install the project into it first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: serve test lint fmt protos bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

serve: $(BIN)/.installed  ## run the service on its embedded default (SQLite + local key file)
	$(BIN)/privacy-vault serve

test: $(BIN)/.installed  ## run the test suite (PostgreSQL tests skip loudly if it is down)
	$(BIN)/pytest

lint: $(BIN)/.installed  ## ruff, mypy, buf lint, the stale-stub check, the deployment files
	$(BIN)/ruff check src tests bench scripts setup.py clients/python
	$(BIN)/ruff format --check src tests bench scripts setup.py clients/python
	$(BIN)/mypy
	$(BIN)/buf lint
	$(BIN)/python scripts/gen_protos.py --check
	BIN=$(BIN) scripts/lint_deploy.sh

fmt: $(BIN)/.installed
	$(BIN)/ruff format src tests bench scripts setup.py clients/python
	$(BIN)/ruff check --fix src tests bench scripts setup.py clients/python

protos: $(BIN)/.installed  ## regenerate the committed stubs from protos/
	$(BIN)/python scripts/gen_protos.py

bench: $(BIN)/.installed  ## the benchmarks, each beside its baseline
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) privacy-vault-data .pytest_cache .mypy_cache .ruff_cache
