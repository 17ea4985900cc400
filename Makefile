# `make demo` and `make test` set everything up on a fresh machine and are safe to run twice.
VENV    ?= .venv
PY      := $(VENV)/bin/python
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
SHARED  ?= ../shared
OUT     ?= out
SUDO    := $(shell [ "$$(id -u)" = "0" ] || echo sudo)

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	@command -v mosquitto >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq mosquitto; }
	@test -x $(PY) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[train,dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/reled scenario import --osm $(SHARED)/data/osm/orlando/orlando_ucf.osm --name orlando --if-missing
	$(BIN)/reled eval --scenario orlando --demand moderate --controller fixed,greedy,max-pressure \
		--seeds 2 --json $(OUT)/demo_orlando.json --plot $(OUT)/demo_orlando.png

test: install
	$(BIN)/ruff check .
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .

bench: install
	$(PY) tools/bench/env_throughput.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache
