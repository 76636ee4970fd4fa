#!/usr/bin/env bash
# The paper's claim end to end in the product (docs/brightness-study.md, "Fine-tuning"):
# `sdfix finetune --model demo-flawed --data demo` with default settings, timed, then mean
# luminance of "solid black background" and "solid white background" (8 seeds, the default
# sampler) for demo-flawed itself (step 0) and every checkpoint, and the loss curve as an SVG.
# Run by hand (about 10-15 minutes on 2 CPU cores); needs only the release binary and python3.
#
#   bash scripts/finetune_study.sh            # SKIP_TRAIN=1 reuses outputs/finetune-demo
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-8}
EVERY=${EVERY:-100}
run=outputs/finetune-demo
docs=docs/brightness-study
cargo build --release --quiet
sdfix=target/release/sdfix
mkdir -p "$docs"

if [ -z "${SKIP_TRAIN:-}" ]; then
  rm -rf "$run"
  # --save-every only adds checkpoints to measure; the training itself is the default one.
  /usr/bin/time -f "%e s wall, %U s user, %M KB max rss" \
    "$sdfix" finetune --model demo-flawed --data demo --out "$run" --save-every "$EVERY" 2>&1 | tee "$run.log"
fi

luminance() { # model colour -> mean luminance over the seeds
  local dir=$run-eval/$(echo "$1" | tr '/' '_')/$2
  rm -rf "$dir"
  "$sdfix" generate --model "$1" --prompt "solid $2 background" --seed 0 --num-images "$SEEDS" \
    --batch-size "$SEEDS" --out-dir "$dir" --quiet
  "$sdfix" stats --json "$dir" | python3 -c 'import json,sys; d=json.load(sys.stdin); v=[i["luminance"] for i in d["images"]]; print(f"{sum(v)/len(v):.3f} ({min(v):.3f}..{max(v):.3f})")'
}

table=$run-eval/table.md
mkdir -p "$run-eval"
{
  echo "| steps | model | black: mean (min..max) | white: mean (min..max) |"
  echo "|---:|---|---|---|"
  echo "| 0 | demo-flawed | $(luminance demo-flawed black) | $(luminance demo-flawed white) |"
  for ckpt in "$run"/checkpoints/step-*; do
    case "$ckpt" in *.partial) continue ;; esac
    step=$((10#${ckpt##*step-}))
    echo "| $step | checkpoints/step-$(printf %06d "$step")/model | $(luminance "$ckpt/model" black) | $(luminance "$ckpt/model" white) |"
  done
  echo "| final | $run (the --out folder) | $(luminance "$run" black) | $(luminance "$run" white) |"
} | tee "$table"

python3 - "$run/train_log.jsonl" "$docs/finetune-loss.svg" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
steps = [r["step"] for r in rows]
loss = [r["loss"] for r in rows]
window = 20
mean = [sum(loss[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(loss))]
w, h, pad = 640, 320, 48
top = max(loss) * 1.05
x = lambda s: pad + (w - 2 * pad) * (s - steps[0]) / max(1, steps[-1] - steps[0])
y = lambda v: h - pad - (h - 2 * pad) * v / top
line = lambda vs, colour, width: '<polyline fill="none" stroke="%s" stroke-width="%s" points="%s"/>' % (
    colour, width, " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in zip(steps, vs)))
ticks = "".join(f'<text x="{pad - 6}" y="{y(v) + 4:.1f}" text-anchor="end" font-size="11">{v:.2f}</text>'
                for v in [top * i / 4 for i in range(5)])
svg = f'''<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif">
<rect width="{w}" height="{h}" fill="white"/>
<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>
<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>
{ticks}
<text x="{w / 2}" y="{h - 12}" text-anchor="middle" font-size="12">step (batch 16); {steps[-1]} steps</text>
<text x="{w / 2}" y="20" text-anchor="middle" font-size="13">sdfix finetune --model demo-flawed --data demo: v-prediction loss</text>
{line(loss, "#bbbbbb", 1)}
{line(mean, "#c0392b", 2)}
<text x="{w - pad}" y="{pad}" text-anchor="end" font-size="11" fill="#c0392b">mean of {window} steps</text>
</svg>
'''
open(sys.argv[2], "w").write(svg)
print(f"wrote {sys.argv[2]}")
PY
