# `make run` and `make test` do all set-up on a fresh Debian machine.
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# The Dovecot hook: a Python script without a .py suffix, linted explicitly.
HOOK := contrib/dovecot/popauth-login
BENCH_JSON ?= bench/results.json
BENCH_ARGS ?=

.PHONY: setup setup-run run test check lint unit bench fuzz clean man lock test-latest \
	test-debian13

# The test daemons (Postfix, Dovecot, Redis...) and development tools.
setup:
	@scripts/bootstrap test

# Only what running popauth needs: never an MTA, a POP server or Redis.
setup-run:
	@scripts/bootstrap run

run: setup-run
	$(VENV)/bin/popauth serve $(if $(CONFIG),--config $(CONFIG))

lint: setup
	$(VENV)/bin/ruff check milter tests bench $(HOOK)
	$(VENV)/bin/ruff format --check milter tests bench $(HOOK)
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --strict --scripts-are-modules $(HOOK)

# The whole suite on this host, then again on Debian 13.
test: check
	@$(MAKE) --no-print-directory test-debian13

# Lint and the whole suite on this host only (what test-debian13 runs inside its root).
check: lint
	$(PY) -m pytest $(PYTEST_ARGS)

# The whole suite (make check) in a fresh Debian 13 root, chrooted; the root
# is cached under /var/cache/popauth-tests. Needs root.
test-debian13:
	@PYTEST_ARGS="$(PYTEST_ARGS)" scripts/test-debian13

unit: setup
	$(PY) -m pytest tests/unit tests/protocol $(PYTEST_ARGS)

# The parsers fuzzed coverage-guided for FUZZ_SECONDS (make test runs 30 s), and the
# property tests with 10,000 examples each.
FUZZ_SECONDS ?= 600
fuzz: setup
	POPAUTH_FUZZ_SECONDS=$(FUZZ_SECONDS) $(PY) -m pytest tests/fuzz -s -q
	POPAUTH_HYPOTHESIS_PROFILE=long $(PY) -m pytest tests/properties -q --hypothesis-show-statistics

# The issue-5 benchmarks (about 6 minutes; needs root). `make bench BENCH_ARGS=--quick`
# for the smoke version (under a minute).
bench: setup
	$(PY) -m bench --json $(BENCH_JSON) $(BENCH_ARGS)

# Refresh requirements/*.lock to the newest releases pyproject.toml allows.
lock:
	@scripts/lock

# The unit, property and protocol suites against the newest releases that
# pyproject.toml allows (not the lock): an upgrade is a decision, not a surprise.
test-latest:
	@scripts/bootstrap test >/dev/null
	rm -rf .venv-latest
	/usr/bin/python3 -m venv .venv-latest
	.venv-latest/bin/pip install -q --disable-pip-version-check --upgrade -e ".[dev]"
	.venv-latest/bin/pip list --disable-pip-version-check 2>/dev/null | grep -iE '^(pymilter|cachetools|structlog|redis|prometheus.client) '
	.venv-latest/bin/python -m pytest -q tests/unit tests/properties tests/protocol $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .venv-latest .cache .mypy_cache .ruff_cache .pytest_cache

# The manual pages, from docs/popauth.rst and docs/configuration.rst.
man: setup
	$(PY) scripts/build-man
