#!/usr/bin/env bash
# Peak RSS and time of one VAE decode, whole and tiled (--vae-tiling, diffusers' enable_tiling()),
# on SD 2.1-base's VAE (models/arch/sd2.1-base/vae/config.json: 512 px tiles) with random
# weights, f32 on the CPU (issue 31):
#
#   bash scripts/vae_tiling_memory.sh target/release/sdfix [SIZE...]     # default: 2048
#
# Each run is `sdfix bench --arch sd2.1-base --vae-only`: the VAE decoder alone (no text encoder,
# no UNet), one decode of Gaussian latents at SIZE x SIZE and the conversion to 8-bit, no warm-up,
# so the process's peak is the decoder's weights plus the decode's activations. The peak is
# /usr/bin/time's maximum RSS (bench's own `peak_memory_mb`, VmHWM, is printed beside it). Prints
# one line per run: size, mode, peak RSS in MB, bench's peak in MB, decode seconds.
set -euo pipefail
[[ $# -ge 1 ]] || { echo "usage: vae_tiling_memory.sh SDFIX [SIZE...]" >&2; exit 2; }
sdfix=$1
shift
if [[ $# -ge 1 ]]; then sizes=("$@"); else sizes=(2048); fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
printf "%-6s %-6s %12s %14s %10s\n" size mode peak_rss_mb bench_peak_mb decode_s
for size in "${sizes[@]}"; do
  for mode in whole tiled; do
    flags=()
    [[ $mode == tiled ]] && flags=(--vae-tiling)
    /usr/bin/time -f "%M" -o "$out/time" "$sdfix" bench --arch sd2.1-base --vae-only --device cpu \
      --width "$size" --height "$size" --repeat 1 --json "${flags[@]}" >"$out/report.json"
    kb=$(cat "$out/time")
    python3 - "$size" "$mode" "$kb" "$out/report.json" <<'EOF'
import json, sys
size, mode, kb, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
report = json.load(open(path))
print(f"{size:<6} {mode:<6} {kb / 1024:12.0f} {report['peak_memory_mb']:14.0f} "
      f"{report['vae_decode_ms']['median'] / 1000:10.1f}")
EOF
  done
done
