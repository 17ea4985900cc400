# `make demo` and `make test` set everything up on a fresh machine and are safe to run twice.
VENV    ?= .venv
PY      := $(VENV)/bin/python
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
SHARED  ?= ../shared
OUT     ?= out
SUDO    := $(shell [ "$$(id -u)" = "0" ] || echo sudo)
# llama-cpp-python compiles llama.cpp (about 5 min on 2 cores). A -march=native build crashed in this
# machine's VM (AMX kernels), so build for plain AVX2, which every x86-64 server of the last decade has.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON

.PHONY: install demo test test-fast lint bench experiments clean

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
	@test -f $(OUT)/demos/cologne8-moderate-verified/manifest.json || $(BIN)/reled demos generate \
		--scenario cologne8 --out $(OUT)/demos/cologne8-moderate-verified
	$(BIN)/reled demos show $(OUT)/demos/cologne8-moderate-verified
	@test -f $(OUT)/runs/demo-ippo-cologne8/summary.json || $(BIN)/reled train --algo ippo --scenario cologne8 \
		--steps 144000 --runs-dir $(OUT)/runs --name demo-ippo-cologne8
	@test -f $(OUT)/runs/demo-reled-cologne8/summary.json || $(BIN)/reled train --algo reled --scenario cologne8 \
		--steps 144000 --demos $(OUT)/demos/cologne8-moderate-verified --runs-dir $(OUT)/runs --name demo-reled-cologne8
	$(BIN)/reled compare $(OUT)/runs/demo-ippo-cologne8 $(OUT)/runs/demo-reled-cologne8 --plot $(OUT)/demo_compare.png
	$(BIN)/reled eval --scenario cologne8 --seeds 3 --controller fixed,greedy,max-pressure \
		--policy $(OUT)/runs/demo-reled-cologne8/latest.pt --policy $(OUT)/runs/demo-ippo-cologne8/latest.pt \
		--json $(OUT)/demo_cologne8.json --plot $(OUT)/demo_cologne8.png
	$(BIN)/reled export --run $(OUT)/runs/demo-reled-cologne8 --out $(OUT)/policy.onnx --int8
	rm -rf $(OUT)/fleet
	$(BIN)/reled-edge fleet up --model $(OUT)/policy.onnx --devices 3 --dir $(OUT)/fleet --replay
	$(BIN)/reled-edge status --keys $(OUT)/fleet/keys --broker-dir $(OUT)/fleet/broker
	$(BIN)/reled-edge fleet down --dir $(OUT)/fleet

test: install
	$(BIN)/ruff check .
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .

bench: install
	$(PY) tools/bench/env_throughput.py
	$(PY) tools/bench/train_throughput.py
	$(PY) tools/bench/llm_throughput.py
	$(PY) tools/bench/sed_verified.py --json $(OUT)/bench_sed_verified.json
	$(PY) tools/bench/edge_bench.py --json $(OUT)/bench_edge.json

# RELED vs IPPO vs MAPPO, docs/results/reled.md: resumable (finished runs are skipped); many hours on 2 cores.
# `make experiments QUICK=1`: the smoke profile (tiny scenarios, minutes), written under $(OUT)/experiments-quick.
experiments: install
	$(PY) tools/experiments/run.py $(if $(QUICK),--quick)
	$(PY) tools/experiments/report.py $(if $(QUICK),--quick)

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache
