# The two commands: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test install install-dev check-sync nbtest pytest lab clean-runs report-check

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "aliprod needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)

# uv installs the same pinned packages as pip, with parallel downloads and unpacking (torch's 5.5 GB in about a minute
# on 2 cores instead of about 2). --compile-bytecode writes the .pyc files at install, as pip does: where
# PYTHONDONTWRITEBYTECODE is set, every process (each stage's kernel, each test) would otherwise compile torch, fastai
# and pandas from source at import. uv is fetched by pip into the venv; INSTALLER=pip installs with pip alone.
INSTALLER ?= uv
ifeq ($(INSTALLER),uv)
PIP_INSTALL = $(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python
else
PIP_INSTALL = $(BIN)/pip install -q
endif

$(BIN)/uv: | $(BIN)/python
	$(BIN)/pip install -q 'uv>=0.5'

$(VENV)/.installed: pyproject.toml | $(BIN)/python $(if $(filter uv,$(INSTALLER)),$(BIN)/uv)
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python $(if $(filter uv,$(INSTALLER)),$(BIN)/uv)
	$(PIP_INSTALL) -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

## make demo: generate the embedded dataset and run the pipeline on it; the report lands in reports/demo/
demo: install
	$(BIN)/aliprod run params/demo.yaml

## make test: package in sync with the notebooks, notebooks clean, then nbdev-test and pytest
test: install-dev check-sync nbtest pytest

# nbdev-export must leave aliprod/ unchanged, nbdev-clean nbs/, and scripts/named_variants.py (the lists of registered
# rules, methods, sources and views) README.md and nbs/index.ipynb.
check-sync: install-dev
	@before=$$(ls aliprod nbs; cat aliprod/*.py nbs/*.ipynb README.md | sha1sum); \
	$(BIN)/nbdev-export && $(BIN)/nbdev-clean && $(BIN)/python scripts/named_variants.py || exit 1; \
	after=$$(ls aliprod nbs; cat aliprod/*.py nbs/*.ipynb README.md | sha1sum); \
	if [ "$$before" != "$$after" ]; then \
	  echo "aliprod/, nbs/ or README.md was out of sync: nbdev-export/nbdev-clean/named_variants changed these files (commit them):"; \
	  git status --porcelain -- aliprod nbs README.md; exit 1; fi
	@echo "check-sync: aliprod/ matches nbs/, notebooks clean, named-variant lists current"

nbtest: install-dev
	$(BIN)/nbdev-test --n-workers 2 --timing

# Two pytest workers, one file each at a time (module fixtures are built once), one torch thread each: the end-to-end
# tests train tiny models, where a second intra-op thread gains little and two workers oversubscribing two cores lose.
pytest: install-dev
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -n 2 --dist loadfile tests

## make report-check: open reports/demo/index.html in headless Chromium (Debian's chromium), screenshots in docs/screenshots/
report-check: install
	@command -v chromium >/dev/null || { echo "report-check needs Chromium: apt-get install chromium"; exit 2; }
	$(PIP_INSTALL) playwright
	$(BIN)/python scripts/report_check.py reports/demo --out docs/screenshots

## make lab: JupyterLab on nbs/explore.ipynb, the run explorer (its first cell names the experiment: demo)
lab: install
	$(PIP_INSTALL) -e '.[lab]' && $(BIN)/jupyter lab nbs/explore.ipynb

clean-runs:
	rm -rf runs reports/*/
