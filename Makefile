# fedcontinuum: two commands do all the set-up.
#   make run   creates .venv if missing, installs, runs the default job (flwr run)
#   make test  same install, runs the whole test suite
# Extra Hydra overrides: make run ARGS="strategy=fedavgm partition=dirichlet partition.rho=10"

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=
PYTEST_ARGS ?=
# two workers (pytest-xdist), one test file each at a time: the e2e simulations mostly wait on
# Ray and SuperLink timeouts, so two of them overlap well on CI's 2 cores
PYTEST_WORKERS ?= 2

.PHONY: run test install sweep bench deploy-local deploy-regions mlflow-ui clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch/torchvision are pinned in pyproject.toml; pip takes them from local disk.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) -m fl_server.launch $(ARGS)

test: install
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# e.g. make sweep ARGS="partition.rho=1,10,100 strategy=fedavg,fedavgm seed=0,1,2"
sweep: install
	$(PY) -m scripts.sweep --multirun $(ARGS)

# every benchmark of the README's Performance section, one after the other (19 min here, 2026-12-04)
bench: install
	$(PY) -m scripts.bench_overhead
	$(PY) -m scripts.bench.aggregation --repeats 5 --no-exact
	$(PY) -m scripts.bench.sweep_startup
	$(PY) -m scripts.bench.scale --quick

# Flower's Deployment Engine on loopback: a SuperLink + N SuperNodes as separate
# processes, TLS with certificates made at run time (--insecure to opt out), e.g.
# make deploy-local ARGS="--supernodes 3 num_rounds=3 [--compare-simulation]"
deploy-local: install
	$(PY) -m scripts.deploy_local $(ARGS)

# a regional tier as its own SuperLink + ServerApp: a global SuperLink with one aggregator
# SuperNode per region, per region a SuperLink with its clients (README, "Hierarchical aggregation"), e.g.
# make deploy-regions ARGS="--regions 2 --clients-per-region 2 num_rounds=2 [--compare-simulation]"
deploy-regions: install
	$(PY) -m scripts.deploy_regions $(ARGS)

mlflow-ui: install
	$(PY) -m fl_server.experiments.mlflow_ui $(ARGS)

clean:
	rm -rf .flwr outputs multirun
