# Mailferry: `make run` starts the whole stack, `make test` runs every test.
# Both install what is missing first (Debian packages, the Python venv, Haraka from npm).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NODE_DEPS := haraka_plugin/node_modules/.package-lock.json

.PHONY: install system venv node run test test-fast bench lint clean

install: system venv node

system:
	@bash scripts/install-system.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

node: $(NODE_DEPS)

$(NODE_DEPS): haraka_plugin/package.json haraka_plugin/package-lock.json
	@cd haraka_plugin && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

run: install
	@$(PY) scripts/run_stack.py

test: install
	@$(PY) -m pytest -q

bench: install
	@$(PY) bench/consumer_throughput.py
	@$(PY) bench/smtp_ingest.py
	@$(PY) bench/scheduler_tick.py
	@$(PY) bench/imap_sync.py
	@$(PY) bench/imap_idle.py
	@$(PY) bench/events.py
	@$(PY) bench/fidelity.py
	@$(PY) bench/storage_backends.py

clean:
	rm -rf var/ .pytest_cache
