#!/usr/bin/env bash
# Peak RSS and wall time of `ablate` on one demo model and on both in one grid (issue 33: a
# two-model sweep frees each model before the next loads, so its peak should be the larger
# model's, not the sum), in alternating rounds so that drifting machine load hits every kind:
#
#   ROUNDS=4 bash scripts/ablate_memory.sh target/release/sdfix
#
# Each run: the fix columns, "solid black background", seeds 0 and 1, 20 steps, f32 on the CPU.
# CONTROL=BIN adds a kind `both-kept`: the same sweep with a build whose ablate keeps every engine
# (weights loaded) to the end instead of dropping it (docs/performance.md gives the two-line
# patch), to show what holding both models would cost and that these runs can tell.
# Prints one line per run, then per kind the mean and range of peak RSS.
set -euo pipefail
[[ $# -eq 1 ]] || { echo "usage: ablate_memory.sh SDFIX" >&2; exit 2; }
sdfix=$1
ROUNDS=${ROUNDS:-4}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
CONTROL=${CONTROL:-}
run() { # kind [flags...] -> appends "kind KB seconds" to $out/runs
  local kind=$1 bin=$sdfix
  shift
  [[ $kind == both-kept ]] && bin=$CONTROL
  /usr/bin/time -f "%M %e" -o "$out/time" "$bin" ablate "$@" --prompt "solid black background" \
    --seeds 0,1 --steps 20 --device cpu -q --overwrite --out-dir "$out/grid" >/dev/null
  read -r kb seconds <"$out/time"
  echo "$kind $kb $seconds" | tee -a "$out/runs"
}
# The demo models' cache folders written before the rounds, so no round pays for that.
run warm --sweep model=demo,demo-flawed >/dev/null
: >"$out/runs"
echo "kind peak_rss_kb seconds"
kinds=(demo demo-flawed both)
[[ -n $CONTROL ]] && kinds+=(both-kept)
for round in $(seq "$ROUNDS"); do
  for i in "${!kinds[@]}"; do
    kind=${kinds[$(((i + round) % ${#kinds[@]}))]}
    case $kind in
      both | both-kept) run "$kind" --sweep model=demo-flawed,demo ;;
      *) run "$kind" --model "$kind" ;;
    esac
  done
done
awk '{n[$1]++; s[$1]+=$2; if (!($1 in lo) || $2<lo[$1]) lo[$1]=$2; if ($2>hi[$1]) hi[$1]=$2}
     END {for (k in n) printf "%s: mean %d KB, range %d-%d KB, %d rounds\n", k, s[k]/n[k], lo[k], hi[k], n[k]}' \
  "$out/runs"
