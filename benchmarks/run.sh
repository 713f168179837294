#!/usr/bin/env bash
# Runs every benchmark with a caching allocator on CPU (tcmalloc, as torch's
# own CPU launcher offers): with glibc malloc, page faults on each fresh
# output dominate every provider alike. Installs libtcmalloc-minimal4 when
# missing and apt-get is usable; otherwise says so and runs with glibc.
set -euo pipefail
PY=${1:-python3}
cd "$(dirname "$0")/.."
find_tcmalloc() { ldconfig -p 2>/dev/null | awk '/libtcmalloc_minimal\.so\.4 /{print $NF; exit}'; }
lib=$(find_tcmalloc)
if [ -z "$lib" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1; }) || true
  lib=$(find_tcmalloc)
fi
if [ -n "$lib" ]; then export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"; else echo "warning: tcmalloc not found; timing with glibc malloc" >&2; fi
exec "$PY" -m benchmarks.run "${@:2}"
