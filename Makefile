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

.PHONY: all install build test demo bench bench-fused bench-cuda clean static-check asan

all: install

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

build: $(STAMP)
	MAX_JOBS=$(JOBS) $(PY) setup.py --quiet build_ext --inplace

install: build

test: build static-check asan
	$(PY) -m pytest $(PYTEST_ARGS)

# Registers, spills and 128-bit SASS accesses of the compiled CUDA kernels (no GPU needed). Runs
# whenever the extension was built with CUDA (it always is in CI: the toolkit is installed).
static-check: build
	@if $(PY) -c "import sys, bnext; sys.exit(0 if bnext.build_info()['cuda'] else 1)"; then \
		$(PY) scripts/cuda_static_check.py --json build/cuda_static_check.json; \
	else \
		echo "static-check: bnext was built without CUDA (BNEXT_CUDA=0), no kernels to check"; \
	fi

# The emulated CUDA kernels under AddressSanitizer: a standalone driver linked with libtorch.
TORCH_DIR = $(shell $(PY) -c "import os, torch; print(os.path.dirname(torch.__file__))" 2>/dev/null)
ASAN_BIN := build/simt_asan
ASAN_SOURCES := $(wildcard csrc/simt/*.cpp csrc/simt/*.h csrc/simt/tools/*.cpp csrc/cuda/* csrc/common/*)
$(ASAN_BIN): $(STAMP) $(ASAN_SOURCES)
	mkdir -p build
	$(CXX) -std=c++20 -O1 -g -fsanitize=address -fno-omit-frame-pointer -pthread \
		-I$(TORCH_DIR)/include -I$(TORCH_DIR)/include/torch/csrc/api/include \
		csrc/simt/tools/asan_driver.cpp csrc/simt/simt.cpp -o $@ \
		-L$(TORCH_DIR)/lib -Wl,-rpath,$(TORCH_DIR)/lib -ltorch -ltorch_cpu -lc10

asan: $(ASAN_BIN)
	ASAN_OPTIONS=abort_on_error=1 OMP_NUM_THREADS=1 $(ASAN_BIN)

# The demo is an example, not library code: it imports the in-place build through PYTHONPATH.
demo: build
	PYTHONPATH=$(CURDIR) $(PY) examples/demo.py $(DEMO_ARGS)

bench: build
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

# Fused BN + activation (+ residual): layers against torch's unfused modules and torch.compile, and
# whole-model training steps (torch vs convert_model vs fuse_model); writes benchmarks/results/fused.json.
bench-fused: build
	$(PY) benchmarks/bench_fused.py $(BENCH_ARGS)

# CUDA timings (CUDA events) against nn.BatchNorm2d (cuDNN); refuses cleanly without a GPU.
bench-cuda: build
	$(PY) benchmarks/bench_cuda.py $(BENCH_ARGS)

clean:
	rm -rf build bnext/*.so *.egg-info
