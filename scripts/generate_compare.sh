#!/usr/bin/env bash
# `sdfix generate` vs diffusers' StableDiffusionPipeline on one model folder, each a fresh process
# from start to PNG, weight loading included: wall seconds and peak RSS (GNU time), alternating
# (sdfix, diffusers, ...) so drifting machine load hits both; prints the best run of each and the
# ratios. Use a real checkpoint, or the real architecture with random weights:
#
#   .venv-oracle/bin/python scripts/make_random_model.py --arch sd2.1-base --out /tmp/sd21base-random
#   bash scripts/generate_compare.sh /tmp/sd21base-random --width 256 --height 256 --steps 2
#
# Flags after the folder go to both (--width, --height, --steps). THREADS (default: all cores)
# sets RAYON_NUM_THREADS for sdfix and --threads for torch; ROUNDS (default 2) the repeats.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: generate_compare.sh MODEL_DIR [--width W --height H --steps N]}
shift
PYTHON=${PYTHON:-.venv-oracle/bin/python}
THREADS=${THREADS:-$(nproc)}
ROUNDS=${ROUNDS:-2}
cargo build --release --quiet
out=$(mktemp -d)
for round in $(seq "$ROUNDS"); do
  RAYON_NUM_THREADS=$THREADS /usr/bin/time -f "%e %M" -o "$out/sdfix-$round.time" \
    target/release/sdfix generate --model "$model" --prompt "solid black background" --seed 0 \
    --prediction v_prediction --zero-snr --spacing trailing --out-dir "$out/sdfix-$round" --quiet "$@"
  /usr/bin/time -f "%e %M" -o "$out/diffusers-$round.time" \
    "$PYTHON" scripts/generate_diffusers.py --model "$model" --threads "$THREADS" --out "$out/diffusers-$round.png" "$@"
  echo "round $round: sdfix $(cat "$out/sdfix-$round.time") / diffusers $(cat "$out/diffusers-$round.time") (s, KB)"
done
python3 - "$out" "$ROUNDS" "$THREADS" "$model" "$*" <<'PY'
import sys, pathlib
out, rounds, threads, model, flags = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
def best(tool):
    runs = [tuple(map(float, (out / f"{tool}-{r}.time").read_text().split())) for r in range(1, rounds + 1)]
    return min(s for s, _ in runs), min(kb for _, kb in runs) / 1024
(ss, sm), (ds, dm) = best("sdfix"), best("diffusers")
print(f"\ngenerate {model} {flags}, {threads} threads, best of {rounds}")
print(f"{'':<22}{'sdfix':>10}{'diffusers':>11}{'ratio':>7}")
print(f"{'start to PNG (s)':<22}{ss:>10.1f}{ds:>11.1f}{ss / ds:>7.2f}")
print(f"{'peak RSS (MB)':<22}{sm:>10.0f}{dm:>11.0f}{sm / dm:>7.2f}")
PY
