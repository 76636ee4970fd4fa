#!/usr/bin/env bash
# Draws README's picture: the paper's comparison, the same prompts and seeds through the demo model
# trained the stock way (demo-flawed) and the one trained with the fixes (demo), under the fix
# columns, as one `sdfix ablate` grid:
#
#     bash scripts/readme_picture.sh [OUT_DIR]
#
# writes OUT_DIR/fixes-demo-flawed-vs-demo.png and its grid.json, OUT_DIR/fixes-demo-flawed-vs-demo.json
# (OUT_DIR: docs/, where README shows them from). $SDFIX names the binary; without it,
# `cargo build --release` makes target/release/sdfix. tests/ablate.rs runs this into a temporary
# folder and compares the grid.json it makes with the committed one (labels, models, each cell's
# settings, luminance to 0.01), so CI fails when the picture no longer shows what sdfix draws.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$repo/docs}"
sdfix="${SDFIX:-}"
if [[ -z $sdfix ]]; then
  (cd "$repo" && cargo build --release --quiet)
  sdfix="$repo/target/release/sdfix"
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
printf 'solid black background\nsolid white background\n' >"$work/prompts.txt"
"$sdfix" ablate --sweep model=demo-flawed,demo --prompts "$work/prompts.txt" --seeds 0,1 \
  --out-dir "$work/grid" --quiet
mkdir -p "$out"
cp "$work/grid/grid.png" "$out/fixes-demo-flawed-vs-demo.png"
cp "$work/grid/grid.json" "$out/fixes-demo-flawed-vs-demo.json"
echo "wrote $out/fixes-demo-flawed-vs-demo.png and .json"
