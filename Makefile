# `make run` and `make test` do all set-up on a fresh Debian machine.
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup run test lint unit bench clean

setup:
	@scripts/bootstrap

run: setup
	$(VENV)/bin/popauth serve $(if $(CONFIG),--config $(CONFIG))

lint: setup
	$(VENV)/bin/ruff check milter tests bench
	$(VENV)/bin/ruff format --check milter tests bench
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

unit: setup
	$(PY) -m pytest tests/unit tests/protocol $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache
