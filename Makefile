# One-command setup: `make install` (idempotent), `make test`, `make train`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Omniglot lives beside the checkout; .ci/run exports the same default.
export IMAML_OMNIGLOT_ROOT ?= $(abspath ../shared/omniglot)

.PHONY: install test train lint mutation clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install_learn2learn.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	bash scripts/install_learn2learn.sh $(PY)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: install
	$(PY) -m pytest -q

train: install
	$(PY) train.py fit

# not part of `make test`: mutation testing of the core takes hours on 2 cores (scripts/mutation.sh)
mutation: install
	bash scripts/mutation.sh $(PY)

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info lightning_logs mutants
