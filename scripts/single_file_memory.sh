#!/usr/bin/env bash
# Peak RSS and wall time of `generate` on the same weights as a diffusers folder and as one LDM
# single file, in alternating rounds (folder then file, then file then folder) so that drifting
# machine load hits both (issue 19: a single file must not cost more than the folder).
#
#   .venv-oracle/bin/python scripts/make_random_model.py --arch sd2.1-base --out /tmp/sd21base-random
#   .venv-oracle/bin/python scripts/make_single_file_fixtures.py \
#       --from-folder /tmp/sd21base-random --out /tmp/sd21base-random.safetensors
#   ROUNDS=4 bash scripts/single_file_memory.sh target/release/sdfix /tmp/sd21base-random \
#       /tmp/sd21base-random.safetensors
#
# The file runs with --prediction epsilon (the folder's type), so it loads nothing the folder
# does not (no UNet-output test). Its `Model hash:` is hashed once before the rounds (then
# cached), so no round pays for that. Prints one line per run, then per kind the mean and range.
set -euo pipefail
[[ $# -eq 3 ]] || { echo "usage: single_file_memory.sh SDFIX FOLDER FILE" >&2; exit 2; }
sdfix=$1 folder=$2 file=$3
ROUNDS=${ROUNDS:-4}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
run() { # kind model [flags...] -> appends "kind KB seconds" to $out/runs
  local kind=$1
  shift
  /usr/bin/time -f "%M %e" -o "$out/time" "$sdfix" generate --model "$@" --prompt "a cat" --seed 0 \
    --steps 1 --width 256 --height 256 -q --overwrite --out-dir "$out/images" >/dev/null
  read -r kb seconds <"$out/time"
  echo "$kind $kb $seconds" | tee -a "$out/runs"
}
"$sdfix" generate --model "$file" --prediction epsilon --prompt x --steps 1 --width 64 --height 64 -q \
  --overwrite --out-dir "$out/warm" >/dev/null
echo "kind peak_rss_kb seconds"
for round in $(seq "$ROUNDS"); do
  if ((round % 2)); then order="folder file"; else order="file folder"; fi
  for kind in $order; do
    if [[ $kind == folder ]]; then run folder "$folder"; else run file "$file" --prediction epsilon; fi
  done
done
awk '{n[$1]++; s[$1]+=$2; if (!($1 in lo) || $2<lo[$1]) lo[$1]=$2; if ($2>hi[$1]) hi[$1]=$2}
     END {for (k in n) printf "%s: mean %d KB, range %d-%d KB, %d rounds\n", k, s[k]/n[k], lo[k], hi[k], n[k];
          if (n["file"] && n["folder"]) printf "file - folder: %+d KB (%+.2f%%)\n",
            s["file"]/n["file"]-s["folder"]/n["folder"], 100*(s["file"]/n["file"]/(s["folder"]/n["folder"])-1)}' \
  "$out/runs"
