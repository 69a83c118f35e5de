# `make run` and `make test` do all set-up on a fresh Debian machine.
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# The login reporters: Python scripts without a .py suffix, linted explicitly.
HOOK := contrib/dovecot/popauth-login contrib/courier/popauth-courier-login
BENCH_JSON ?= bench/results.json
BENCH_ARGS ?=

.PHONY: setup setup-run run try test check lint unit bench bench-publish fuzz clean man lock \
	test-latest test-distro-python test-debian13 deb

# The test daemons (Postfix, Dovecot, Redis...) and development tools.
setup:
	@scripts/bootstrap test

# Only what running popauth needs: never an MTA, a POP server or Redis.
setup-run:
	@scripts/bootstrap run

# The try-it mode's sockets and state: a directory of the checkout, where no
# MTA is attached (docs/try-it.rst).
TRY_IT_DIR := $(CURDIR)/.cache/try-it

# popauth serve: on CONFIG, or learning from this host's Postfix or Sendmail;
# with neither, the try-it mode under TRY_IT_DIR.
run: setup-run
	@$(VENV)/bin/popauth serve --try-it-if-no-mta "$(TRY_IT_DIR)" $(if $(CONFIG),--config "$(CONFIG)")

# The try-it mode even where an MTA or a popauth service is configured.
try: setup-run
	@$(VENV)/bin/popauth serve --try-it "$(TRY_IT_DIR)"

lint: setup
	$(VENV)/bin/ruff check milter harness tests bench $(HOOK)
	$(VENV)/bin/ruff format --check milter harness tests bench $(HOOK)
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --strict --scripts-are-modules $(HOOK)

# Lint and every test on this host, then the unit, protocol and property
# suites once more on the distribution's own Python packages (what
# test-debian13 runs inside its root too).
check: lint
	$(PY) -m pytest $(PYTEST_ARGS)
	@scripts/test-distro-python

# The whole suite on this host, then again in a fresh Debian 13 root.
test: check
	@$(MAKE) --no-print-directory test-debian13

# The whole suite (make check) in a fresh Debian 13 root, chrooted; the root
# is cached under /var/cache/popauth-tests. Needs root.
test-debian13:
	@PYTEST_ARGS="$(PYTEST_ARGS)" scripts/test-debian13

# The unit and protocol suites without the tests marked live: no root, no
# daemon but popauth itself.
unit: setup
	$(PY) -m pytest -m "not live" tests/unit tests/protocol $(PYTEST_ARGS)

# The parsers fuzzed coverage-guided for FUZZ_SECONDS (make test runs 30 s), and the
# property tests with 10,000 examples each.
FUZZ_SECONDS ?= 600
fuzz: setup
	POPAUTH_FUZZ_SECONDS=$(FUZZ_SECONDS) $(PY) -m pytest tests/fuzz -s -q
	POPAUTH_HYPOTHESIS_PROFILE=long $(PY) -m pytest tests/properties -q --hypothesis-show-statistics

# The benchmarks (about 15 minutes; needs root), results in BENCH_JSON.
# `make bench BENCH_ARGS=--quick` for the smoke version (about a minute),
# `BENCH_ARGS="--only session-renewals,soak"` for some of them.
bench: setup
	$(PY) -m bench --json $(BENCH_JSON) $(BENCH_ARGS)

# Make the last full run the committed one (bench/results/latest.json) and
# regenerate the figures table of docs/performance.rst from it.
bench-publish: setup
	$(PY) -m bench.report --publish $(BENCH_JSON)

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

# The unit, protocol and property suites on the distribution's own packages of
# popauth's dependencies (python3-milter, python3-structlog...): Debian 12 or 13,
# as root; the venv holds only the test tools (see docs/dependencies.rst).
test-distro-python:
	@scripts/test-distro-python $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .venv-latest .venv-distro* .cache .mypy_cache .ruff_cache .pytest_cache

# The Debian package popauth_VERSION_all.deb (debian/), built in a temporary
# copy of the tree and checked with lintian; installs its build dependencies.
deb:
	@scripts/build-deb

# The manual pages, from docs/popauth.rst and docs/configuration.rst.
man: setup
	$(PY) scripts/build-man
