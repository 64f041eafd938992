# Two commands set everything up on a fresh machine:
#   make quick   -> installs into .venv (first time) and runs the main job (configs/quick.yaml)
#   make test    -> installs into .venv (first time) and runs the whole test suite (CI runs this)
#   make test-fast -> the unit tier only: no slow, Ray, browser, compile or GPU tests (about 2 minutes)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out/quick

.PHONY: install quick test test-fast leaderboard clean

$(BIN)/nlbench: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch first: a bare range would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/nlbench

install: $(BIN)/nlbench

quick: install
	$(BIN)/nlbench run configs/quick.yaml --out $(OUT)

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not ray and not browser and not compile and not gpu"

# the published leaderboard in reports/ (about 2 hours on 2 CPU cores, estimated; re-runs skip finished runs)
leaderboard: install
	$(BIN)/nlbench run configs/standard.yaml --out out/standard
	$(BIN)/nlbench run configs/capability.yaml --out out/capability
	$(BIN)/nlbench bench configs/throughput.yaml --out out/tp-cpu
	$(BIN)/nlbench report out/standard out/capability out/tp-cpu --format all --out-dir reports

clean:
	rm -rf $(VENV) out .pytest_cache
