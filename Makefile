# `make up` runs Candlekeep; `make test` runs the tests. Both install what they need first:
# the Python venv (.venv) and, for the tests, the services they talk to (redis-server).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: up test venv system-deps kafka-jars bench bench-all run-benches clean web chromium

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

up: venv | web/dist/index.html
	$(BIN)/candlekeep up

test: venv system-deps kafka-jars web chromium
	$(BIN)/pytest -q

# Each bench measures its own baseline in the same run and exits 1 on a missed target. `make bench` is
# the data path's gate (issue 13: backfill, aggregator, reads); `make bench-all` adds the replay, book,
# web and venue-book benches. Every bench runs even after a miss; the target fails at the end.
GATE_BENCHES := bench/backfill.py bench/stream.py bench/api.py
ALL_BENCHES := $(GATE_BENCHES) bench/replay.py bench/books.py bench/venue_books.py bench/web.py

bench: venv kafka-jars
	@$(MAKE) --no-print-directory run-benches BENCHES="$(GATE_BENCHES)"

bench-all: venv kafka-jars web chromium
	@$(MAKE) --no-print-directory run-benches BENCHES="$(ALL_BENCHES)"

run-benches:
	@failed=""; for b in $(BENCHES); do echo "== $$b"; $(BIN)/python $$b || failed="$$failed $$b"; done; \
	  if [ -n "$$failed" ]; then echo "missed targets in:$$failed"; exit 1; fi; echo "every target met"

clean:
	rm -rf $(VENV) .candlekeep .pytest_cache web/node_modules web/dist

# --- web dashboard (issue 12) ----------------------------------------------------------------------
# The page the API serves at `/` (and /docs, /redoc's files): npm packages from the registry as
# package-lock.json pins them, built by Vite into web/dist (git-ignored). `make up` builds it only
# when missing (order-only above), and goes on without it when npm is not installed: `/` then says
# how to build it. `make web` rebuilds after a change.
WEB_SOURCES := web/package.json web/package-lock.json web/index.html web/vite.config.ts web/tsconfig.json \
	$(wildcard web/src/*)

web: web/dist/index.html

web/dist/index.html: $(WEB_SOURCES)
	@command -v npm >/dev/null 2>&1 || { \
	  echo "npm not found: the dashboard (/) is not built; install Node.js and npm, then run make web"; exit 0; }; \
	  cd web && npm ci --no-audit --no-fund --loglevel=error && npm run build

# The browser tests' Chromium: Debian's package (/usr/bin/chromium), installed only when missing.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing chromium"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }
