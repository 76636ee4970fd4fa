#!/usr/bin/env bash
# The samplers table of docs/brightness-study.md: for every --sampler, on both demo models with
# default settings and 20 steps, the luminance of "solid black/white background" (SEEDS seeds)
# and of unconditional images (UNCOND seeds); and, on demo, how much the terminal alpha_bar clamp
# of other tools (--terminal-alpha-bar comfy, diffusers) changes the images against exact:
# mean |diff| in 8-bit pixel values. About 8 minutes on 2 CPU cores.
#
#   bash scripts/sampler_study.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv-oracle/bin/python}   # any Python 3 with Pillow
SEEDS=${SEEDS:-8}
UNCOND=${UNCOND:-32}
STEPS=${STEPS:-20}
work=outputs/sampler-study
cargo build --release --quiet
sdfix=target/release/sdfix
rm -rf "$work" && mkdir -p "$work"
samplers=(ddim euler euler_a dpmpp_2m dpmpp_2m_sde unipc)
run() { # dir prompt seed count flags...
  local dir=$1 prompt=$2 seed=$3 count=$4
  shift 4
  "$sdfix" generate --prompt "$prompt" --seed "$seed" --num-images "$count" --batch-size "$count" \
    --steps "$STEPS" --out-dir "$dir" --quiet "$@"
  "$sdfix" stats --json "$dir" >"$dir.json"
}
cases() { # dir flags...
  local dir=$1
  shift
  run "$dir/black" "solid black background" 0 "$SEEDS" "$@"
  run "$dir/white" "solid white background" 0 "$SEEDS" "$@"
  run "$dir/unconditional" "" 1000 "$UNCOND" --guidance 1 "$@"
}
for sampler in "${samplers[@]}"; do
  cases "$work/demo/$sampler/exact" --model demo --sampler "$sampler"
  # demo-flawed predicts epsilon: zero SNR cannot apply, the rest of the defaults do.
  cases "$work/demo-flawed/$sampler/exact" --model demo-flawed --no-zero-snr --sampler "$sampler"
  for clamp in comfy diffusers; do
    cases "$work/demo/$sampler/$clamp" --model demo --sampler "$sampler" --terminal-alpha-bar "$clamp"
  done
  echo "$sampler done"
done

"$PYTHON" - "$work" "${samplers[@]}" <<'PY'
import json, pathlib, sys
from PIL import Image
work, samplers = pathlib.Path(sys.argv[1]), sys.argv[2:]
def summary(d):
    return json.loads(pathlib.Path(f"{d}.json").read_text())["summary"]
def pixels(path):
    return Image.open(path).convert("RGB").tobytes()
def diff(a, b):
    total, count, worst = 0, 0, 0
    for kind in ("black", "white", "unconditional"):
        for p in sorted((a / kind).glob("*.png")):
            x, y = pixels(p), pixels(b / kind / p.name)
            d = [abs(i - j) for i, j in zip(x, y)]
            total, count, worst = total + sum(d), count + len(d), max(worst, max(d))
    return f"{total / count:.2f} (max {worst})"
rows = ["| model | sampler | black: mean (min..max) | white: mean (min..max) | unconditional: mean, std | exact vs comfy: mean abs diff /255 | exact vs diffusers |",
        "| --- | --- | --- | --- | --- | --- | --- |"]
fmt = lambda s: f"{s['mean']:.3f} ({s['min']:.3f}..{s['max']:.3f})"
for model in ("demo", "demo-flawed"):
    for sampler in samplers:
        base = work / model / sampler
        b, w, u = (summary(base / "exact" / k) for k in ("black", "white", "unconditional"))
        clamps = [diff(base / "exact", base / c) for c in ("comfy", "diffusers")] if model == "demo" else ["", ""]
        rows.append(f"| {model} | {sampler} | {fmt(b)} | {fmt(w)} | {u['mean']:.3f}, {u['std']:.3f} | {clamps[0]} | {clamps[1]} |")
print("\n".join(rows))
PY
