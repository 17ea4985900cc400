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

.PHONY: install demo test test-fast test-py310 test-arm64 lint bench experiments clean

$(STAMP): pyproject.toml
	@command -v mosquitto >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq mosquitto; }
	@test -x $(PY) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[train,dev,ray]'
	@touch $(STAMP)

install: $(STAMP)

# The whole story on the embedded defaults (cologne8, SmolLM2 in the package): SED's verified demonstrations, a
# short RELED training, the ONNX export, a fleet of 8 controller processes behind Mosquitto, the deploy, a
# hardware-in-the-loop run, one table (fixed-time, max-pressure, the policy in simulation and on the controllers)
# and its charts in $(OUT)/demo/. Finished steps are kept: a second `make demo` redoes only the fleet and HIL run.
DEMO := $(OUT)/demo
demo: install
	@test -f $(DEMO)/demos/manifest.json || $(BIN)/reled demos generate --scenario cologne8 --out $(DEMO)/demos
	@test -f $(DEMO)/runs/reled-cologne8/summary.json || $(BIN)/reled train --algo reled --scenario cologne8 \
		--demos $(DEMO)/demos --steps 288000 --runs-dir $(DEMO)/runs --name reled-cologne8
	@test -f $(DEMO)/policy.onnx || $(BIN)/reled export --run $(DEMO)/runs/reled-cologne8 --out $(DEMO)/policy.onnx
	@test -f $(DEMO)/eval.json || $(BIN)/reled eval --scenario cologne8 --controller fixed,max-pressure \
		--policy $(DEMO)/policy.onnx --seeds 1 --json $(DEMO)/eval.json --plot $(DEMO)/eval.png
	@$(BIN)/reled-edge fleet down --dir $(DEMO)/fleet >/dev/null
	rm -rf $(DEMO)/fleet
	$(BIN)/reled-edge fleet up --hil --model $(DEMO)/policy.onnx --dir $(DEMO)/fleet
	$(BIN)/reled hil run --scenario cologne8 --fleet $(DEMO)/fleet --speed max --compare $(DEMO)/eval.json \
		--out $(DEMO)/hil; status=$$?; $(BIN)/reled-edge fleet down --dir $(DEMO)/fleet; exit $$status

test: install
	$(BIN)/ruff check .
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

# The controller's tests on Python 3.10, a Jetson's (tools/platforms/py310.py: a cached venv with '.[edge]'); one
# line and exit 0 where no 3.10 is found.
test-py310: install
	$(PY) tools/platforms/py310.py

# The controller on arm64, emulated (tools/arm64/run.py: a cached Debian bookworm arm64 root under qemu-user-static,
# `pip install '.[edge]'`, self-test, 500 decisions, deploy and rollback over loopback); as root, minutes.
test-arm64: install
	PY=$(PY) tools/arm64/run.sh --json $(OUT)/arm64.json

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
