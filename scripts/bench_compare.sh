#!/usr/bin/env bash
# sdfix vs diffusers on the same machine, same architecture, resolution, steps, dtype and threads,
# run alternately (sdfix, diffusers, sdfix, diffusers) so drifting machine load hits both; prints
# each run's JSON and the sdfix/diffusers ratios of the better run of each.
#
#   bash scripts/bench_compare.sh --arch sd2.1-base --width 256 --height 256 --steps 3 --repeat 2
#
# Any flag is passed to both (--arch, --width, --height, --steps, --batch-size, --repeat, --dtype,
# --device, --profile: then each stage's time per kind of op too). THREADS (default: all cores)
# sets RAYON_NUM_THREADS for sdfix and --threads for torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv-oracle/bin/python}
THREADS=${THREADS:-$(nproc)}
ROUNDS=${ROUNDS:-2}
cargo build --release --quiet
out=$(mktemp -d)
for round in $(seq "$ROUNDS"); do
  RAYON_NUM_THREADS=$THREADS target/release/sdfix bench --json "$@" | tee "$out/sdfix-$round.json"
  "$PYTHON" scripts/bench_diffusers.py --threads "$THREADS" "$@" | tee "$out/diffusers-$round.json"
done
python3 - "$out" "$ROUNDS" <<'PY'
import json, sys, pathlib
out, rounds = pathlib.Path(sys.argv[1]), int(sys.argv[2])
def best(tool):
    runs = [json.loads((out / f"{tool}-{r}.json").read_text()) for r in range(1, rounds + 1)]
    return min(runs, key=lambda r: r["total_s"])
s, d = best("sdfix"), best("diffusers")
print(f"\n{s['arch']} {s['width']}x{s['height']}, {s['steps']} steps, {s['dtype']} on {s['device']}, {s['threads']} threads")
print(f"{'stage':<20}{'sdfix':>12}{'diffusers':>12}{'ratio':>8}")
for key in ("text_encode_ms", "unet_step_ms", "ddim_guidance_ms", "vae_decode_ms"):
    a, b = s[key]["median"], d[key]["median"]
    print(f"{key:<20}{a:>12.1f}{b:>12.1f}{a / b:>8.2f}")
print(f"{'total_s':<20}{s['total_s']:>12.2f}{d['total_s']:>12.2f}{s['total_s'] / d['total_s']:>8.2f}")
print(f"{'peak_memory_mb':<20}{s['peak_memory_mb']:>12.0f}{d['peak_memory_mb']:>12.0f}{s['peak_memory_mb'] / d['peak_memory_mb']:>8.2f}")
if "op_ms" in s and "op_ms" in d:
    for stage in ("text_encode", "unet_step", "vae_decode"):
        a, b = s["op_ms"][stage], d["op_ms"][stage]
        print(f"\n{stage + ' ops (ms)':<20}{'sdfix':>12}{'diffusers':>12}{'ratio':>8}")
        for op in sorted(set(a) | set(b), key=lambda op: -a.get(op, 0.0)):
            x, y = a.get(op, 0.0), b.get(op, 0.0)
            print(f"  {op:<18}{x:>12.1f}{y:>12.1f}{(x / y if y else float('nan')):>8.2f}")
PY
