#!/usr/bin/env bash
# sdfix's CPU attention beside PyTorch's SDPA, same shapes and thread count, best of 5 each:
# the UNet's self-attention at 256 and 512 px (1024 and 4096 tokens, 5 heads of 64, CFG batch 2),
# its cross-attention (77 keys), and the text encoder's causal self-attention (77 tokens, 16 heads).
#
#   THREADS=2 bash scripts/attention_compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv-oracle/bin/python}
THREADS=${THREADS:-$(nproc)}
cargo build --release --quiet --example attention_bench
for shape in "2 1024 1024 5 64" "2 4096 4096 5 64" "2 4096 77 5 64" "2 77 77 16 64 causal"; do
  RAYON_NUM_THREADS=$THREADS target/release/examples/attention_bench $shape
  "$PYTHON" - $shape "$THREADS" <<'PY'
import sys, time, torch
import torch.nn.functional as F
args = sys.argv[1:]
causal = "causal" in args
b, n, m, h, d, threads = (int(a) for a in args if a != "causal")
torch.set_num_threads(threads)
q, k, v = torch.randn(b, h, n, d), torch.randn(b, h, m, d), torch.randn(b, h, m, d)
F.scaled_dot_product_attention(q, k, v, is_causal=causal)
best = float("inf")
for _ in range(5):
    start = time.perf_counter()
    F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    best = min(best, time.perf_counter() - start)
print(f"torch {b}x{n}x{m} heads={h} d={d}{' causal' if causal else ''}: {best * 1e3:.2f} ms, {4 * b * h * n * m * d / best / 1e9:.1f} GFLOP/s")
PY
done
