# `make up` runs Candlekeep; `make test` runs the tests. Both install what they need first:
# the Python venv (.venv) and, for the tests, the services they talk to (redis-server).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: up test venv system-deps kafka-jars bench clean

$(BIN)/candlekeep: pyproject.toml
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	@touch $@

venv: $(BIN)/candlekeep

# Real services for the tests: Redis from Debian's packages, and Java + Maven for the Kafka broker,
# each installed only when missing.
system-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server; }
	@{ command -v java >/dev/null 2>&1 && command -v mvn >/dev/null 2>&1; } || { \
	  echo "installing openjdk-17-jre-headless and maven"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq openjdk-17-jre-headless maven; }

# The streaming tests' real Kafka broker: jars from Maven Central into testinfra/kafka/target/libs
# (git-ignored, cached in ~/.m2); does nothing when they are already there.
kafka-jars: system-deps
	testinfra/kafka/fetch-jars.sh

up: venv
	$(BIN)/candlekeep up

test: venv system-deps kafka-jars
	$(BIN)/pytest -q

bench: venv kafka-jars
	$(BIN)/python bench/backfill.py
	$(BIN)/python bench/stream.py
	$(BIN)/python bench/replay.py

clean:
	rm -rf $(VENV) .candlekeep .pytest_cache
