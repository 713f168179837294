#!/usr/bin/env bash
# The test suites against another torch / triton pair, on a CPU machine:
#   bash python_tests/versions.sh 2.11.0 3.6.0 [python3.12]
# Makes a virtual environment under $WORK (default /tmp/equitune_versions), copies
# this checkout there (tracked and untracked files, no build outputs), builds the
# CPU extension against that torch and runs the CPU suite, then the Triton kernels
# under the interpreter. Not part of CI (two builds, ~15 minutes on 2 cores);
# README ("Versions") says which pairs were run and what they gave.
set -uo pipefail
TORCH=${1:?torch version, e.g. 2.11.0}
TRITON=${2:?triton version, e.g. 3.6.0}
PYTHON=${3:-python3}
WORK=${WORK:-/tmp/equitune_versions}/torch-$TORCH-triton-$TRITON
cd "$(dirname "$0")/.."
rm -rf "$WORK" && mkdir -p "$WORK/src"
git ls-files -co --exclude-standard | tar cf - -T - | (cd "$WORK/src" && tar xf -)
"$PYTHON" -m venv "$WORK/venv" || exit 1
PY=$WORK/venv/bin/python
# Example dependencies left out: those tests fail on import, the others are what this checks.
$PY -m pip install -q "torch==$TORCH" "triton==$TRITON" numpy pytest pybind11 ninja setuptools tqdm || exit 1
cd "$WORK/src"
MAX_JOBS=${MAX_JOBS:-2} $PY setup.py build_ext --inplace >build.log 2>&1 || { tail -20 build.log; exit 1; }
$PY -c "import torch, triton, equitune_ext as E; print('torch', torch.__version__, 'triton', triton.__version__, E.build_info())"
$PY -m pytest -q -p no:cacheprovider python_tests | tail -n 15
TRITON_INTERPRET=1 $PY -m pytest -q -p no:cacheprovider python_tests -k triton | tail -n 15
