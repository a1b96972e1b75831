# Router: the two commands that matter are `make dev` (run the router) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: install dev test test-unit lint format bench bench-peers clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

## Every service on local defaults, one log stream, API on :8000.
dev: install
	scripts/ensure-services.sh
	$(VENV)/bin/router dev

## The whole suite (pytest's testpaths: tests and bench): unit, integration (real RabbitMQ +
## Redis), faults (fault injection), e2e (compose, with a Docker engine), bench/test_bench.py.
## Two pytest-xdist workers: the suite mostly waits on processes and deadlines, so two halve it
## on two cores; each module, and the whole fault suite, stays on one worker.
TEST_WORKERS ?= 2
test: install
	scripts/ensure-services.sh
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadgroup

test-unit: install
	$(VENV)/bin/pytest tests/unit

lint: install
	$(VENV)/bin/ruff format --check shared services fakes tests bench
	$(VENV)/bin/ruff check shared services fakes tests bench
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff format shared services fakes tests bench
	$(VENV)/bin/ruff check --fix shared services fakes tests bench

## The benchmark (bench/README.md): router vs the direct path (and LiteLLM, once
## `make bench-peers` made bench/.peers). BENCH_QUICK=1 for a ~3-minute smoke run.
bench: install
	scripts/ensure-services.sh
	bench/ensure-wrk.sh
	$(PY) -m bench

## LiteLLM's proxy (pinned) and py-spy in bench/.peers, then the bench with LiteLLM required.
bench-peers: install
	bench/peers.sh
	scripts/ensure-services.sh
	bench/ensure-wrk.sh
	BENCH_PEERS=require $(PY) -m bench

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
