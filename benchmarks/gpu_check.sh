#!/usr/bin/env bash
# One prepared check for a lent GPU machine (torch 2.11 + triton 3.6 there, no
# package registry): build against the installed torch, measure the
# device-to-device copy bandwidth and every provider with
# triton.testing.do_bench, run the CUDA and Triton tests, and write markdown
# tables under $OUT.
#   OUT=/tmp/out bash benchmarks/gpu_check.sh
# Time: the device tool stops a command at 600 s and lends 15 minutes in all
# (machine start included), so the script keeps to BUDGET seconds (default
# 570): every phase has a timeout that also leaves time for the phases after
# it. Order: build, copy bandwidth, the [256, 64, 56, 56] table (the main
# numbers), the host time per call and the [32, ...] table, the tests (at most
# 300 s, leaving 60 s), then the equi-tuning step, the volume ops, the vmap table
# and the compile counts as far as the budget goes.
# The tests keep one config per Triton autotuner (EQUITUNE_TRITON_AUTOTUNE=0:
# nothing timed, each kernel compiled once; the strategy tests force the other
# transform configs); the benchmarks autotune as users do.
# The device tool brings back at most 8 files from $OUT, so everything lands in
# gpu_build.log, gpu_bench.log, gpu_tests.log, the two image-op tables and the
# call-overhead table (.md), a tarball of every result file this run wrote, and
# gpu_prebuilt.tgz (the built extension, for PREBUILT= in a later run on a
# fresh machine).
set -uo pipefail
OUT=${OUT:-/tmp/equitune_gpu_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PY:-python3}
BUDGET=${BUDGET:-570}
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }
stamp() { echo "[gpu_check] $1 at +$(elapsed) s"; }

# The C++ sources' hash, taken before the build (so build outputs cannot change it).
SOURCES_SHA=$(cat setup.py CMakeLists.txt $(find csrc -type f | LC_ALL=C sort) | sha256sum)

touch "$OUT/gpu_build.log"  # result files newer than this one were written by this run
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  # PREBUILT: a gpu_prebuilt.tgz from an earlier run (the extension built there): used when
  # it was built from the same C++ sources, which saves the build's minute on a fresh machine.
  # One that does not load (built against another torch) is replaced by a build.
  loads() { $PY -c "import equitune_ext as E; assert E.build_info()['cuda']; print(E.build_info())"; }
  if [[ -n ${PREBUILT:-} && -f $PREBUILT ]] && [[ $(tar xzf "$PREBUILT" -O prebuilt_sources.sha) == "$SOURCES_SHA" ]] \
      && tar xzf "$PREBUILT" --exclude prebuilt_sources.sha && loads; then
    echo "extension taken from $PREBUILT"
  else
    rm -f equitune_ext/_C*.so
    timeout 240 $PY -m pip install --no-build-isolation --no-deps -q -e . && loads
  fi
  stamp "built"
} 2>&1 | tee "$OUT/gpu_build.log"

# within MAX KEEP CMD...: run CMD for at most MAX seconds, and stop it in time to
# leave KEEP seconds of the budget for what follows; skip it if under 10 are left.
within() {
  local max=$1 keep=$2; shift 2
  local t=$(( BUDGET - $(elapsed) - keep ))
  t=$(( t > max ? max : t ))
  if (( t < 10 )); then echo "[gpu_check] no time left for: $*"; return 124; fi
  timeout "$t" "$@"
}
bench_shape() {  # one image-op table; copied only when written by this run (the committed ones are older)
  local name="image_ops_cuda_$(echo "$*" | tr ' ' 'x')"
  within "$BENCH_MAX" "$BENCH_KEEP" $PY -m benchmarks.bench_image_ops --device cuda --shape "$@" --out "$name" &&
    cp "benchmarks/results/$name.md" "$OUT/"  # the .json is in gpu_results.tgz
  stamp "$name"
}

# The main timings first: copy bandwidth and the [256, 64, 56, 56] table.
{
  within 30 0 $PY - <<'PYEOF'
import torch
from triton.testing import do_bench
x = torch.randn(2 * 1024**3 // 4, device="cuda")  # 2 GiB, random (never time zeros)
y = torch.empty_like(x)
t = do_bench(lambda: y.copy_(x), return_mode="median") * 1e-3
print(f"| {torch.cuda.get_device_name()} | device-to-device copy, 2 GiB | {2 * x.numel() * 4 / t / 1e9:.0f} GB/s (read + write) |")
PYEOF
  BENCH_MAX=150 BENCH_KEEP=150 bench_shape 256 64 56 56
  within 60 150 $PY -m benchmarks.bench_call_overhead --device cuda && cp benchmarks/results/call_overhead_cuda.md "$OUT/"
  stamp "call_overhead"
  BENCH_MAX=110 BENCH_KEEP=120 bench_shape 32 64 56 56
} 2>&1 | tee "$OUT/gpu_bench.log" | grep -v "^| " | tail -n 3

# Every test that runs on CUDA (device / backend ids name it) and every Triton test,
# leaving 60 s for the rest. -v: one line per test as it ends, so a run cut off
# by the timeout still names its failures (the short summary comes only at the end).
# --continue-on-collection-errors: a module whose example dependency (tqdm, scikit-learn) that
# machine lacks must not stop the CUDA and Triton tests of the others.
xdist=$($PY -c "import xdist" 2>/dev/null && echo "-n 12")
EQUITUNE_TRITON_AUTOTUNE=0 within 300 60 $PY -m pytest -v -rfE $xdist -p no:cacheprovider --continue-on-collection-errors \
  -k "cuda or triton" python_tests >"$OUT/gpu_tests.log" 2>&1
echo "pytest exit $?" >>"$OUT/gpu_tests.log"
stamp "tests done" | tee -a "$OUT/gpu_tests.log"
grep -E "FAILED|ERROR|passed|failed|no time left" "$OUT/gpu_tests.log" | tail -n 25

# Then the rest, as far as the budget goes.
{
  within 45 10 $PY -m benchmarks.bench_equi_average --device cuda --batch 32 --size 112 && stamp "equi_average"
  within 40 10 $PY -m benchmarks.bench_volume --device cuda --only ops && stamp "volume"  # 3-D kernels vs the copy rate
  within 30 0 $PY -m benchmarks.bench_vmap --device cuda >/dev/null && stamp "vmap"  # the vmap rule's copy-or-loop choice
  within 30 0 $PY -m benchmarks.triton_compiled >/dev/null && stamp "triton_compiled"  # registers etc. under this triton
} 2>&1 | tee -a "$OUT/gpu_bench.log" | grep -v "^| " | tail -n 5

find benchmarks/results -type f -newer "$OUT/gpu_build.log" | tar czf "$OUT/gpu_results.tgz" -T - 2>/dev/null
echo "$SOURCES_SHA" >prebuilt_sources.sha && tar czf "$OUT/gpu_prebuilt.tgz" prebuilt_sources.sha equitune_ext/_C*.so; rm -f prebuilt_sources.sha
# Last: the short table the reply carries (copy bandwidth, the forward rows, the autotuner's choices).
grep -h "copy, 2 GiB" "$OUT/gpu_bench.log"
grep -h "^| cuda" "$OUT/call_overhead_cuda.md" 2>/dev/null | cut -d"|" -f4-6
for f in "$OUT"/image_ops_cuda_*.md; do
  echo "$f"; grep -E "forward \| (fused|floor|ref|triton)" "$f" | cut -d"|" -f3-9,12
  grep -A 12 "autotuner's choices" "$f"
done
stamp "end"
