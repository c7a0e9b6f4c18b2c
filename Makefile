# Developer entry points. `make test` and `make stress` bootstrap everything they need.

# One virtualenv per interpreter: `make suite PYTHON=python3.13 VENV=.venv313` (as .ci/run does).
PYTHON ?= python3
VENV ?= .venv
# AMQP_URL (environment or command line) reaches the recipes; unset, each tool uses its default.

PYTEST_ARGS ?=
STRESS_ARGS ?=
BENCH_ARGS ?=

VENV_PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Lint every Python directory of the repository.
LINT_PATHS := $(wildcard src tests stress examples)

.PHONY: venv rabbitmq lint typecheck test suite stress bench bench-quick cluster cluster-stop clean

# A venv made by another interpreter than PYTHON is an error (pick another VENV), never reused.
define check_venv_python
	@want=$$($(PYTHON) -c 'import sys; print(sys.version)') && \
	have=$$($(VENV_PY) -c 'import sys; print(sys.version)') && \
	if [ "$$want" != "$$have" ]; then \
		echo "$(VENV) runs Python $$have, not $(PYTHON) ($$want): set VENV=..." >&2; exit 1; \
	fi
endef

venv: $(STAMP)
	$(check_venv_python)

# Re-install whenever pyproject.toml is newer than the stamp.
$(STAMP): pyproject.toml
	@if [ ! -x "$(VENV_PY)" ]; then \
		echo "Creating $(VENV) with $(PYTHON)"; \
		$(PYTHON) -m venv "$(VENV)"; \
	fi
	$(check_venv_python)
	$(VENV_PY) -m pip install --quiet --disable-pip-version-check -e '.[test,stress]'
	@touch "$(STAMP)"

rabbitmq:
	@scripts/ensure-rabbitmq

# ruff on every Python directory, then the type checks.
lint: venv
	$(VENV)/bin/ruff check $(LINT_PATHS)
	@$(MAKE) --no-print-directory typecheck

# mypy and pyright on src/, settings in pyproject.toml; typings/ holds the stubs of py-amqp.
# pyright runs on Node.js (the pyright package fetches its npm build on first use).
typecheck: venv
	$(VENV)/bin/mypy
	$(VENV)/bin/pyright --pythonpath "$(VENV_PY)"

test: venv rabbitmq lint
	$(VENV_PY) -m pytest -q $(PYTEST_ARGS)

# The suite alone (no lint), e.g. on a second interpreter.
suite: venv rabbitmq
	$(VENV_PY) -m pytest -q $(PYTEST_ARGS)

stress: venv rabbitmq
	@if [ ! -f stress/run.py ]; then \
		echo "stress/run.py does not exist yet: the stress harness has not landed." >&2; \
		exit 1; \
	fi
	$(VENV_PY) -m stress.run $(STRESS_ARGS)

# Every benchmark workload (stress/workloads/), one after the other; `bench-quick` is the smoke
# run of the same (one short repeat, reports in stress/results/quick/).
bench: venv rabbitmq
	$(VENV_PY) -m stress.runner --all $(BENCH_ARGS)

bench-quick: venv rabbitmq
	$(VENV_PY) -m stress.runner --all --quick $(BENCH_ARGS)

# A local 3-node cluster beside the default server (AMQP 5691-5693); `make test` starts and stops
# it by itself when the cluster tests run. See scripts/rabbitmq-cluster.
cluster:
	@scripts/rabbitmq-cluster start

cluster-stop:
	@scripts/rabbitmq-cluster stop

clean:
	rm -rf "$(VENV)" build dist .pytest_cache .ruff_cache .mypy_cache
	find . -path ./.git -prune -o \( -name __pycache__ -o -name '*.egg-info' \) -type d -prune -exec rm -rf {} +
