# `make up` runs Candlekeep; `make test` runs the tests. Both install what they need first:
# the Python venv (.venv) and, for the tests, the services they talk to (redis-server).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: up test venv system-deps bench clean

$(BIN)/candlekeep: pyproject.toml
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	@touch $@

venv: $(BIN)/candlekeep

# Real services for the tests: Redis from Debian's packages when it is not on the machine.
system-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server; }

up: venv
	$(BIN)/candlekeep up

test: venv system-deps
	$(BIN)/pytest -q

bench: venv
	$(BIN)/python bench/backfill.py

clean:
	rm -rf $(VENV) .candlekeep .pytest_cache
