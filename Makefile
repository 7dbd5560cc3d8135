# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test docs bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# Real data beside the repository when present; otherwise the library's own lookup
# ($$NEMON_DATA, ~/.cache/nemon_np) and download.
DATA_DIR ?= $(wildcard ../shared/data)
TRAIN_FLAGS ?=

## run: create .venv, install, train NEMON on MNIST (outputs in runs/mnist-<timestamp>)
run: $(STAMP)
	$(PY) -m nemon_np.train --dataset mnist $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(TRAIN_FLAGS)

## test: create .venv, install, run the whole suite
test: $(STAMP)
	$(PY) -m pytest -q

## docs: the documentation site (Sphinx: API reference, user guide, benchmarks) in docs/_build/html,
## warnings as errors
DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	rm -rf docs/_build docs/generated
	$(PY) -m sphinx -q -W -b html docs docs/_build/html
	@echo "wrote docs/_build/html/index.html"

## bench: the benchmarks whose output is recorded in docs/benchmarks.md
bench: $(STAMP)
	$(PY) benchmarks/bench_core.py
	$(PY) benchmarks/bench_train.py $(if $(DATA_DIR),--data-dir $(DATA_DIR))
	$(PY) benchmarks/bench_conv.py

clean:
	rm -rf $(VENV) build *.egg-info docs/_build docs/generated
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
