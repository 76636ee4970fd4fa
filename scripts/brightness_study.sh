#!/usr/bin/env bash
# Regenerates every number and picture of docs/brightness-study.md (about 10 minutes on 2 CPU
# cores). Needs the release binary (built here) and, for the training-set images and the t = T
# diagnostic, the Python environment of scripts/train_demo.py (PYTHON, default .venv-oracle/bin/python).
#
#   bash scripts/brightness_study.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv-oracle/bin/python}
SEEDS=${SEEDS:-16}          # seeds per brightness prompt and setting
UNCOND=${UNCOND:-128}       # seeds for the unconditional distribution
work=outputs/brightness-study
docs=docs/brightness-study
cargo build --release --quiet
sdfix=target/release/sdfix
rm -rf "$work" && mkdir -p "$work" "$docs"

echo "training set luminance"
"$PYTHON" scripts/train_demo.py --dump-training-images "$work/training" --examples 512 >/dev/null
"$sdfix" stats --json "$work/training" >"$work/training.json"
"$sdfix" stats "$work/training" --histogram "$docs/histogram-training.png" --title "training set (512 images)" >/dev/null

# The paper's progression. demo-flawed predicts epsilon, so zero SNR cannot apply to it.
settings=(baseline zero-snr trailing all-fixes)
flags() { # model setting
  case "$1:$2" in
    *:baseline) echo "--baseline" ;;
    demo:zero-snr) echo "--spacing leading --zero-snr --guidance-rescale 0" ;;
    demo:trailing) echo "--spacing trailing --zero-snr --guidance-rescale 0" ;;
    demo:all-fixes) echo "--spacing trailing --zero-snr --guidance-rescale 0.7" ;;
    demo-flawed:zero-snr) echo "n/a" ;;
    demo-flawed:trailing) echo "--spacing trailing --no-zero-snr --guidance-rescale 0" ;;
    demo-flawed:all-fixes) echo "--spacing trailing --no-zero-snr --guidance-rescale 0.7" ;;
  esac
}
for model in demo demo-flawed; do
  for setting in "${settings[@]}"; do
    f=$(flags "$model" "$setting")
    [ "$f" = "n/a" ] && continue
    for colour in black white; do
      dir="$work/$model/$setting/$colour"
      # shellcheck disable=SC2086
      "$sdfix" generate --model "$model" --prompt "solid $colour background" --seed 0 \
        --num-images "$SEEDS" --batch-size "$SEEDS" $f --out-dir "$dir" --quiet
      "$sdfix" stats --json "$dir" >"$dir.json"
    done
    # The unconditional distribution at the two ends of the progression.
    if [ "$setting" = baseline ] || [ "$setting" = all-fixes ]; then
      dir="$work/$model/$setting/unconditional"
      # shellcheck disable=SC2086
      "$sdfix" generate --model "$model" --prompt "" --guidance 1 --seed 1000 \
        --num-images "$UNCOND" --batch-size 32 $f --out-dir "$dir" --quiet
      "$sdfix" stats --json "$dir" >"$dir.json"
    fi
    echo "$model $setting done"
  done
  "$sdfix" stats "$work/$model/baseline/unconditional" --histogram "$docs/histogram-$model-baseline.png" \
    --title "$model, baseline sampler: unconditional" >/dev/null
  "$sdfix" stats "$work/$model/all-fixes/unconditional" --histogram "$docs/histogram-$model-all-fixes.png" \
    --title "$model, fixed sampler: unconditional" >/dev/null
  printf 'solid black background\nsolid white background\n' >"$work/brightness-prompts.txt"
  "$sdfix" ablate --model "$model" --prompts "$work/brightness-prompts.txt" --num-seeds 4 \
    --out-dir "$work/$model/sheet" --quiet
  cp "$work/$model/sheet/grid.png" "$docs/contact-sheet-$model.png"
done

echo "t = T diagnostic"
"$PYTHON" scripts/study_diagnostic.py models/demo-flawed "$SEEDS" >"$docs/diagnostic.json"

python3 - "$work" "$docs" <<'PY'
import json, sys, pathlib
work, docs = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
def load(p):
    return json.loads(p.read_text()) if p.exists() else None
rows = ["| model | sampler | black: mean (min..max) | white: mean (min..max) | corr(noise, lum.): black, white | unconditional: mean, std | corr(noise, lum.): unconditional |",
        "| --- | --- | --- | --- | --- | --- | --- |"]
for model in ("demo", "demo-flawed"):
    for setting in ("baseline", "zero-snr", "trailing", "all-fixes"):
        b, w, u = (load(work / model / setting / f"{k}.json") for k in ("black", "white", "unconditional"))
        if b is None:
            rows.append(f"| {model} | {setting} | n/a (epsilon model) | | | | |")
            continue
        fmt = lambda s: f"{s['mean']:.3f} ({s['min']:.3f}..{s['max']:.3f})"
        uncond = f"{u['summary']['mean']:.3f}, {u['summary']['std']:.3f}" if u else ""
        corr = f"{u['noise_correlation']:.2f}" if u and u["noise_correlation"] is not None else ""
        c = lambda r: f"{r['noise_correlation']:.2f}" if r["noise_correlation"] is not None else "-"
        rows.append(f"| {model} | {setting} | {fmt(b['summary'])} | {fmt(w['summary'])} | {c(b)}, {c(w)} | {uncond} | {corr} |")
t = json.loads((work / "training.json").read_text())["summary"]
rows.append(f"| training set | (512 images) | | | | {t['mean']:.3f}, {t['std']:.3f} | |")
(docs / "results.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
PY
