#!/usr/bin/env bash
# One prepared check for a lent GPU machine (torch 2.11 + triton 3.6 there, no
# package registry): build against the installed torch, run the CUDA and
# Triton tests, measure the device-to-device copy bandwidth and every provider
# with triton.testing.do_bench, and write markdown tables under $OUT.
#   OUT=/tmp/out bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PY:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  $PY -m pip install --no-build-isolation --no-deps -q -e . && $PY -c "import equitune_ext as E; print(E.build_info())"
} 2>&1 | tee "$OUT/gpu_build.log"
$PY -m pytest -q -x python_tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
$PY - <<'PYEOF' 2>&1 | tee "$OUT/gpu_copy_bandwidth.md"
import torch
from triton.testing import do_bench
x = torch.empty(2 * 1024**3 // 4, device="cuda")  # 2 GiB
y = torch.empty_like(x)
t = do_bench(lambda: y.copy_(x), return_mode="median") * 1e-3
print(f"| {torch.cuda.get_device_name()} | device-to-device copy | {2 * x.numel() * 4 / t / 1e9:.0f} GB/s (read + write) |")
PYEOF
for shape in "32 64 56 56" "256 64 56 56"; do
  name="image_ops_cuda_$(echo $shape | tr ' ' 'x')"
  $PY -m benchmarks.bench_image_ops --device cuda --shape $shape --out "$name" 2>&1 | tail -40
  cp "benchmarks/results/$name.md" "$OUT/" 2>/dev/null
done
