#!/usr/bin/env bash
# Two sdfix binaries (say, before and after a change) on the same `bench` command, in alternating
# rounds (A then B, then B then A) so drifting machine load hits both; prints each run's JSON,
# then per stage the median over rounds of each binary's time and the median of the rounds'
# paired ratios (B / A of the same round), with every round's ratio.
#
#   git worktree add /tmp/before REV && (cd /tmp/before && cargo build --release)
#   ROUNDS=3 bash scripts/bench_ab.sh /tmp/before/target/release/sdfix target/release/sdfix \
#       --arch sd2.1-base --width 256 --height 256 --steps 8 --repeat 2 --device cpu
#
# Every flag after the two binaries goes to `bench` (plus --json). THREADS (default: all cores)
# sets RAYON_NUM_THREADS.
set -euo pipefail
[[ $# -ge 2 ]] || { echo "usage: bench_ab.sh BINARY_A BINARY_B [bench flags...]" >&2; exit 2; }
a=$1 b=$2
shift 2
THREADS=${THREADS:-$(nproc)}
ROUNDS=${ROUNDS:-3}
out=$(mktemp -d)
for round in $(seq "$ROUNDS"); do
  if (( round % 2 )); then order="A B"; else order="B A"; fi
  for which in $order; do
    if [[ $which == A ]]; then binary=$a; else binary=$b; fi
    RAYON_NUM_THREADS=$THREADS "$binary" bench --json "$@" | tee "$out/$which-$round.json"
  done
done
python3 - "$out" "$ROUNDS" "$a" "$b" <<'PY'
import json, sys, pathlib, statistics
out, rounds = pathlib.Path(sys.argv[1]), int(sys.argv[2])
runs = {w: [json.loads((out / f"{w}-{r}.json").read_text()) for r in range(1, rounds + 1)] for w in "AB"}
def value(run, key):
    return run[key]["median"] if isinstance(run[key], dict) else run[key]
first = runs["A"][0]
print(f"\nA = {sys.argv[3]}\nB = {sys.argv[4]}")
print(f"{first['arch']} {first['width']}x{first['height']}, {first['steps']} steps, {first['dtype']} on "
      f"{first['device']}, {first['threads']} threads, {rounds} rounds")
print(f"{'stage':<20}{'A':>10}{'B':>10}{'B/A':>7}   per round")
for key in ("text_encode_ms", "unet_step_ms", "ddim_guidance_ms", "vae_decode_ms", "total_s", "peak_memory_mb"):
    xa = [value(r, key) for r in runs["A"]]
    xb = [value(r, key) for r in runs["B"]]
    ratios = [y / x for x, y in zip(xa, xb)]
    digits = 2 if key in ("total_s", "ddim_guidance_ms") else 1
    print(f"{key:<20}{statistics.median(xa):>10.{digits}f}{statistics.median(xb):>10.{digits}f}"
          f"{statistics.median(ratios):>7.2f}   " + " ".join(f"{q:.2f}" for q in ratios))
PY
