# `make run` and `make test` create .venv when missing, install cnnkit from the pins,
# then run the demo or the tests. `make install` only installs; a second run is a no-op.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.cnnkit-installed

.PHONY: install run test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
	@touch $(STAMP)

run: install
	$(BIN)/cnnkit demo

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

bench: install
	$(BIN)/python benchmarks/train_overhead.py
	$(BIN)/python benchmarks/digits_vs_svc.py

clean:
	rm -rf $(VENV) runs build src/*.egg-info
