#!/usr/bin/env bash
# sdfix vs diffusers on the same machine, same architecture, resolution, steps, dtype and threads,
# run in alternating rounds (sdfix then diffusers, then the other way round) so drifting machine
# load hits both; prints each run's JSON, then per stage the median over rounds of each tool's
# time and the median of the rounds' paired ratios (sdfix / diffusers of the same round), with
# every round's ratio, so the spread is in the table.
#
#   ROUNDS=3 bash scripts/bench_compare.sh --arch sd2.1-base --width 256 --height 256 --steps 3 --repeat 2
#
# Any flag is passed to both (--arch, --width, --height, --steps, --batch-size, --repeat, --dtype,
# --device, --profile: then each stage's time per kind of op too, and the linear layers' by
# shape, medians over rounds). THREADS
# (default: all cores) sets RAYON_NUM_THREADS for sdfix and --threads for torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv-oracle/bin/python}
THREADS=${THREADS:-$(nproc)}
ROUNDS=${ROUNDS:-2}
cargo build --release --quiet
out=$(mktemp -d)
run_sdfix() { RAYON_NUM_THREADS=$THREADS target/release/sdfix bench --json "$@"; }
run_diffusers() { "$PYTHON" scripts/bench_diffusers.py --threads "$THREADS" "$@"; }
for round in $(seq "$ROUNDS"); do
  if (( round % 2 )); then order="sdfix diffusers"; else order="diffusers sdfix"; fi
  for tool in $order; do
    "run_$tool" "$@" | tee "$out/$tool-$round.json"
  done
done
python3 - "$out" "$ROUNDS" <<'PY'
import json, sys, pathlib, statistics
out, rounds = pathlib.Path(sys.argv[1]), int(sys.argv[2])
runs = {tool: [json.loads((out / f"{tool}-{r}.json").read_text()) for r in range(1, rounds + 1)]
        for tool in ("sdfix", "diffusers")}
def value(run, key):
    return run[key]["median"] if isinstance(run[key], dict) else run[key]
s0 = runs["sdfix"][0]
print(f"\n{s0['arch']} {s0['width']}x{s0['height']}, {s0['steps']} steps, {s0['dtype']} on {s0['device']}, "
      f"{s0['threads']} threads, {rounds} rounds")
print(f"{'stage':<20}{'sdfix':>10}{'diffusers':>11}{'ratio':>7}   per round")
for key in ("text_encode_ms", "unet_step_ms", "ddim_guidance_ms", "vae_decode_ms", "total_s", "peak_memory_mb"):
    a = [value(r, key) for r in runs["sdfix"]]
    b = [value(r, key) for r in runs["diffusers"]]
    ratios = [x / y for x, y in zip(a, b)]
    digits = 2 if key == "total_s" else 1
    print(f"{key:<20}{statistics.median(a):>10.{digits}f}{statistics.median(b):>11.{digits}f}{statistics.median(ratios):>7.2f}   "
          + " ".join(f"{q:.2f}" for q in ratios))
if all("op_ms" in r for rs in runs.values() for r in rs):
    for stage in ("text_encode", "unet_step", "vae_decode"):
        ops = {tool: [r["op_ms"][stage] for r in rs] for tool, rs in runs.items()}
        names = set().union(*ops["sdfix"], *ops["diffusers"])
        med = {tool: {op: statistics.median(o.get(op, 0.0) for o in ops[tool]) for op in names} for tool in ops}
        print(f"\n{stage + ' ops (ms)':<20}{'sdfix':>10}{'diffusers':>11}{'ratio':>7}")
        for op in sorted(names, key=lambda op: -med["sdfix"][op]):
            x, y = med["sdfix"][op], med["diffusers"][op]
            print(f"  {op:<18}{x:>10.1f}{y:>11.1f}{(x / y if y else float('nan')):>7.2f}")
if all("linear_ms_by_shape" in r for rs in runs.values() for r in rs):
    for stage in ("text_encode", "unet_step"):
        shapes = {tool: [r["linear_ms_by_shape"][stage] for r in rs] for tool, rs in runs.items()}
        names = set().union(*shapes["sdfix"], *shapes["diffusers"])
        med = {tool: {s: statistics.median(o.get(s, {}).get("ms", 0.0) for o in shapes[tool]) for s in names}
               for tool in shapes}
        calls = {s: max(o.get(s, {}).get("calls", 0) for o in shapes["sdfix"] + shapes["diffusers"]) for s in names}
        print(f"\n{stage + ' linear by shape':<24}{'calls':>6}{'sdfix':>10}{'diffusers':>11}{'ratio':>7}")
        for s in sorted(names, key=lambda s: -med["sdfix"][s]):
            x, y = med["sdfix"][s], med["diffusers"][s]
            if max(x, y) >= 1.0:
                print(f"  {s:<22}{calls[s]:>6.0f}{x:>10.1f}{y:>11.1f}{(x / y if y else float('nan')):>7.2f}")
PY
