# Two commands on a fresh machine:
#   make demo   installs the environment and runs the whole DAG on the synthetic demo data
#   make test   installs the environment (with test tools) and runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= all
# The prebuilt CPU mmcv wheel (see ../shared/wheels/BUILD.md); when present, `make test` installs
# the mmdet engine with it so that engine is tested too.
MMCV_WHEEL ?= $(firstword $(wildcard ../shared/wheels/mmcv-2.1.0-cp311-*.whl))
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: demo test install install-test install-mmdet mmcv report readme readme-check dag lint config-docs pull clean-results

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -c requirements.lock -e ".[workflow]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -c requirements.lock -e ".[test]"
	if [ -n "$(MMCV_WHEEL)" ]; then $(MAKE) install-mmdet MMCV_WHEEL="$(MMCV_WHEEL)"; fi
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# mmdet engine from a built mmcv wheel (MMCV_WHEEL=...), or build one first with `make mmcv`.
install-mmdet: $(VENV)/.installed
	test -n "$(MMCV_WHEEL)" || { echo "no mmcv wheel: run 'make mmcv' first"; exit 1; }
	$(PIP) install --no-deps "$(MMCV_WHEEL)"
	$(PIP) install -c requirements.lock -e ".[mmdet]"

# Build mmcv 2.1.0 with compiled ops against torch 2.14 (C++20 fix), CUDA when nvcc is present.
mmcv: $(VENV)/.installed
	$(BIN)/python scripts/build_mmcv.py --out build/wheels
	$(MAKE) install-mmdet MMCV_WHEEL="$$(ls build/wheels/mmcv-2.1.0-*.whl | head -1)"

demo: install
	$(BIN)/snakemake --profile profiles/default --cores $(CORES)
	$(BIN)/snakemake --profile profiles/default --report results/report.html
	@echo "Report: results/report.html"

test: install-test
	$(BIN)/python -m pytest tests

report: install
	$(BIN)/snakemake --profile profiles/default --report results/report.html

# The README's demo figures are results/headline.md of a run (rule headline): copy them in, or check.
readme: install
	$(BIN)/python -m cxrssl.headline --headline results/headline.md --readme README.md

readme-check: install
	$(BIN)/python -m cxrssl.headline --headline results/headline.md --readme README.md --check

dag: install
	$(BIN)/snakemake --profile profiles/default --rulegraph | dot -Tsvg > docs/dag.svg

# Fetch checkpoints and results from the DVC remote, then let Snakemake adopt them (no retraining).
pull: install
	PATH="$(CURDIR)/$(BIN):$$PATH" scripts/dvc_pull.sh

lint: install
	$(BIN)/snakemake --lint

# config/README.md (every setting) from the config schema; tests/test_cli.py fails when it is stale.
config-docs: install
	$(BIN)/python -m cxrssl config-docs

clean-results:
	rm -rf results/* data/demo .snakemake
