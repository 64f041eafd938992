# Two commands set everything up on a fresh machine:
#   make quick   -> installs into .venv (first time) and runs the main job (configs/quick.yaml)
#   make test    -> installs into .venv (first time) and runs the whole test suite (CI runs this)
#   make test-fast -> the unit tier only: no slow, Ray, browser, compile or GPU tests (~80 s of CPU;
#                     about 2 minutes on 2 idle cores)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out/quick
# result tables of every published config (reports/data/<config name>/), read by `make report`;
# the CMS ablation's are read apart (--ablation) so its Hope arms are not ranked entries
ABLATION := reports/data/cms-ablation
PUBLISHED := $(filter-out $(ABLATION),$(patsubst %/,%,$(sort $(wildcard reports/data/*/))))
ABLATION_ARG := $(if $(wildcard $(ABLATION)/runs),--ablation $(ABLATION))

.PHONY: install quick test test-fast leaderboard tuned-leaderboard cms-ablation in-context report clean

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
	$(BIN)/nlbench report out/standard out/capability out/tp-cpu $(PUBLISHED) --format all --out-dir reports

# the tuned leaderboard: per-entry selection on tuning seeds 100-101, then reporting seeds 0-5
# (configs/leaderboard.yaml; ~1.5-1.9 h on 2 cores, estimated; re-runs resume), published with `make report`
tuned-leaderboard: install
	nice -n 10 $(BIN)/nlbench leaderboard configs/leaderboard.yaml --out reports/data/leaderboard --until runs
	$(MAKE) report

# the CMS ablation (configs/cms-ablation.yaml; see docs/decisions.md for its time; re-runs resume),
# published with `make report` as the report's CMS ablation section (figures/cms_ablation_<stream>.png)
cms-ablation: install
	nice -n 10 $(BIN)/nlbench run configs/cms-ablation.yaml --out $(ABLATION)
	$(MAKE) report

# the in-context section (configs/in-context-cpu.yaml; see reports/in-context/README.md for times):
# meta-train the outer weights, stream unseen tasks, then re-report everything published
in-context: install
	$(BIN)/nlbench pretrain configs/in-context-cpu.yaml --out reports/data/in-context-cpu
	$(BIN)/nlbench run configs/in-context-cpu.yaml --out reports/data/in-context-cpu
	$(MAKE) report

# reports/ from the committed result tables alone (reports/data/<config name>/, one dir per
# published config; seconds): reproduces reports/leaderboard.json and reports/in-context/
report: install
	rm -rf reports/figures reports/in-context/figures  # no figure of an earlier report left behind
	$(BIN)/nlbench report $(PUBLISHED) $(ABLATION_ARG) --format all --out-dir reports
	$(BIN)/nlbench report reports/data/in-context-cpu --format all --out-dir reports/in-context

clean:
	rm -rf $(VENV) out .pytest_cache
