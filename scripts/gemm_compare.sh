#!/usr/bin/env bash
# One f32 matrix product in the gemm crate (as sdfix's CPU kernels call it) beside PyTorch's, on 1
# and on THREADS threads: the measurements behind docs/performance.md's remarks on gemm threading.
#
#   bash scripts/gemm_compare.sh            # the UNet's widest conv as one product, CLIP's MLP
#   SHAPES="4096 320 320,1024 2560 640" bash scripts/gemm_compare.sh   # any M K N, comma-separated
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv-oracle/bin/python}
THREADS=${THREADS:-$(nproc)}
cargo build --release --quiet --example gemm_bench
IFS=',' read -r -a shapes <<< "${SHAPES:-640 5760 1024,154 1024 2048}"
for shape in "${shapes[@]}"; do
  RAYON_NUM_THREADS=1 target/release/examples/gemm_bench $shape single
  RAYON_NUM_THREADS=$THREADS target/release/examples/gemm_bench $shape pool
  "$PYTHON" - $shape "$THREADS" <<'PY'
import sys, time, torch
m, k, n, threads = map(int, sys.argv[1:])
for t in (1, threads):
    torch.set_num_threads(t)
    a, w = torch.ones(m, k), torch.ones(n, k)
    best = min((lambda s: (torch.nn.functional.linear(a, w), time.perf_counter() - s)[1])(time.perf_counter()) for _ in range(6))
    print(f"torch {m}x{k}x{n} threads={t}: {best * 1e3:.2f} ms, {2 * m * k * n / best / 1e9:.1f} GFLOP/s")
PY
done
