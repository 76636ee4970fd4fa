#!/usr/bin/env bash
# The img2img table of docs/brightness-study.md: from a mid-grey picture (128/255), "solid black
# background" and "solid white background" at strengths 0.25 .. 1 on both demo models (default
# settings otherwise: the paper's fixes; demo-flawed without zero SNR, an epsilon model), SEEDS
# seeds each, 20 steps: the mean luminance, min..max. About 3 minutes on 2 CPU cores.
#
#   bash scripts/img2img_study.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-8}
STEPS=${STEPS:-20}
work=outputs/img2img-study
cargo build --release --quiet
sdfix=target/release/sdfix
rm -rf "$work" && mkdir -p "$work"
# A 32x32 mid-grey PNG, written with the Python standard library only (zlib).
python3 - "$work/grey.png" <<'PY'
import struct, sys, zlib
w = h = 32
raw = b"".join(b"\x00" + bytes([128, 128, 128]) * w for _ in range(h))
def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
png += chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
open(sys.argv[1], "wb").write(png)
PY
strengths=(0.25 0.5 0.75 1)
for model in demo demo-flawed; do
  for strength in "${strengths[@]}"; do
    for colour in black white; do
      dir="$work/$model/$strength/$colour"
      "$sdfix" generate --model "$model" --prompt "solid $colour background" --seed 0 --num-images "$SEEDS" \
        --batch-size "$SEEDS" --steps "$STEPS" --init-image "$work/grey.png" --strength "$strength" \
        --out-dir "$dir" --quiet
      "$sdfix" stats --json "$dir" >"$dir.json"
    done
  done
  echo "$model done"
done
python3 - "$work" "${strengths[@]}" <<'PY'
import json, sys, pathlib
work, strengths = pathlib.Path(sys.argv[1]), sys.argv[2:]
rows = ["| model | strength | black: mean (min..max) | white: mean (min..max) |", "| --- | --- | --- | --- |"]
for model in ("demo", "demo-flawed"):
    for s in strengths:
        cell = []
        for colour in ("black", "white"):
            r = json.loads((work / model / s / f"{colour}.json").read_text())["summary"]
            cell.append(f"{r['mean']:.3f} ({r['min']:.3f}..{r['max']:.3f})")
        rows.append(f"| {model} | {s} | {cell[0]} | {cell[1]} |")
print("\n".join(rows))
PY
