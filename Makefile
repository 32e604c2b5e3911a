# `make run` and `make test` create .venv when missing, install cnnkit from the pins,
# then run the demo or the tests. `make install` only installs; a second run is a no-op.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.cnnkit-installed
# test files run on this many pytest-xdist workers, each with its share of the cores (tests/conftest.py)
TEST_WORKERS ?= 2

.PHONY: install browser bench-data run test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
	@# the corruption tests' reference; its declared opencv-python needs libGL, so the headless build stands in
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps imagecorruptions==1.1.2
	@touch $(STAMP)

# Debian's Chromium for the web page test of `cnnkit serve` (needs root and apt; else the test skips)
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
	  echo "note: Chromium is not installed and could not be (needs root and apt); the web page test will skip"

# real images the benchmarks' second datasets are cut from (OpenCV's sample data: 5,000 handwritten digits,
# photographs); Debian's opencv-doc, about 95 MB (needs root and apt)
bench-data:
	@test -f /usr/share/doc/opencv-doc/examples/data/digits.png || { command -v apt-get >/dev/null 2>&1 && \
	  [ "$$(id -u)" = 0 ] && apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends opencv-doc >/dev/null; } || \
	  echo "note: opencv-doc is not installed and could not be (needs root and apt)"

run: install
	$(BIN)/cnnkit demo

test: install browser
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow"

bench: install
	$(BIN)/python benchmarks/train_overhead.py
	$(BIN)/python benchmarks/digits_vs_svc.py

clean:
	rm -rf $(VENV) runs build src/*.egg-info
