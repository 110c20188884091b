# The two README commands, `make demo` and `make test`, work on a fresh clone: they create .venv,
# install the pinned requirements, build the extension in place (ninja), then run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.requirements-installed
JOBS   ?= 2
PYTEST_ARGS ?=
BENCH_ARGS ?=
DEMO_ARGS ?=

.PHONY: all install build test demo bench clean

all: install

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

build: $(STAMP)
	MAX_JOBS=$(JOBS) $(PY) setup.py --quiet build_ext --inplace

install: build

test: build
	$(PY) -m pytest $(PYTEST_ARGS)

demo: build
	$(PY) -m bnext.demo $(DEMO_ARGS)

bench: build
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

clean:
	rm -rf build bnext/*.so *.egg-info
