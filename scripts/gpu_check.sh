#!/usr/bin/env bash
# One self-contained check on a GPU machine, with the binary built by scripts/build_cuda.sh and the
# repository's fixtures (about 5 minutes on an H100):
# 1. nvidia-smi and the CUDA libraries found;
# 2. the tiny-model parity tests on CUDA in f32 and f16 against the committed diffusers references
#    (f32: the CPU bars; f16: final latents within 2e-2, pixels within 8/255);
# 3. sdfix bench and scripts/bench_diffusers.py, same settings, same card, same run;
# 4. a table: per-step ms, end-to-end s, peak memory, ratio to diffusers, fraction of the FLOP floor.
#
#   SDFIX=target-cuda/release/sdfix bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
SDFIX=${SDFIX:-target-cuda/release/sdfix}
PYTHON=${PYTHON:-python3}
out=${OUT:-outputs/gpu-check}
mkdir -p "$out"
site=$("$PYTHON" -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null || true)
export LD_LIBRARY_PATH=$site/nvidia/cu13/lib:$site/nvidia/cudnn/lib:${LD_LIBRARY_PATH:-}

echo "== 1. machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
for lib in libcuda.so.1 libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10; do
  printf '%-20s %s\n' "$lib" "$(ldconfig -p | grep -m1 "$lib" | awk '{print $NF}' || true)$(ls "$site"/nvidia/cu13/lib/$lib 2>/dev/null)"
done
ldd "$SDFIX" | grep -E "not found" && { echo "missing libraries"; exit 1; }

echo "== 2. parity on CUDA"
refs=tests/fixtures/refs
status=0
for dtype in f32 f16; do
  for case in all_fixes baseline no_cfg non_square_negative epsilon_no_zero_snr; do
    dir=$out/parity-$dtype-$case
    rm -rf "$dir"
    args=$("$PYTHON" -c "import json; print(' '.join(json.load(open('$refs/pipeline.json'))['$case']))")
    "$PYTHON" - "$refs/pipeline.safetensors" "$case" "$dir/initial.safetensors" <<'PY'
import sys, safetensors.torch as st, pathlib
t = st.load_file(sys.argv[1]); pathlib.Path(sys.argv[3]).parent.mkdir(parents=True, exist_ok=True)
st.save_file({"latents": t[sys.argv[2] + ".initial"].contiguous()}, sys.argv[3])
PY
    # shellcheck disable=SC2086
    eval "$SDFIX" generate --model tests/fixtures/tiny-sd --device cuda --dtype $dtype --seed 0 --save-latents \
      --latents "$dir/initial.safetensors" --out-dir "$dir" --quiet $args || status=1
    "$PYTHON" - "$refs/pipeline.safetensors" "$case" "$dir" "$dtype" <<'PY' || status=1
import sys, glob, numpy as np, safetensors.torch as st
from PIL import Image
refs, case, folder, dtype = st.load_file(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
lat_tol, px_tol = (2e-3, 2) if dtype == "f32" else (2e-2, 8)
pngs = sorted(glob.glob(folder + "/*.png"))
worst_lat = max(float((st.load_file(p[:-4] + ".latents.safetensors")["latents"] - refs[case + ".final"][i]).abs().max()) for i, p in enumerate(pngs))
ref_img = refs[case + ".image"].permute(0, 2, 3, 1).numpy().astype(int)
worst_px = max(int(np.abs(np.asarray(Image.open(p).convert("RGB")).astype(int) - ref_img[i]).max()) for i, p in enumerate(pngs))
ok = worst_lat <= lat_tol and worst_px <= px_tol
print(f"{dtype} {case:<22} latents {worst_lat:.2e} (<= {lat_tol:g}) pixels {worst_px}/255 (<= {px_tol}) {'ok' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
PY
  done
done

echo "== 3. benchmark: sd2.1-base 512x512, 20 steps, f16"
bench_args=(--arch sd2.1-base --width 512 --height 512 --steps 20 --dtype f16 --repeat 3)
"$SDFIX" bench --json --device cuda "${bench_args[@]}" >"$out/sdfix.json" || status=1
"$PYTHON" scripts/bench_diffusers.py --device cuda "${bench_args[@]}" >"$out/diffusers.json" || status=1

echo "== 4. table"
"$PYTHON" - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
s, d = (json.loads((out / f).read_text()) for f in ("sdfix.json", "diffusers.json"))
# 804 GFLOP per UNet forward at 512 px, x2 for CFG; H100 bf16 dense ~790 TFLOP/s measured.
floor_ms = 2 * 804e9 / 790e12 * 1000
print(f"{'':<18}{'sdfix':>10}{'diffusers':>11}{'ratio':>7}")
for k in ("unet_step_ms", "vae_decode_ms", "text_encode_ms"):
    print(f"{k:<18}{s[k]['median']:>10.2f}{d[k]['median']:>11.2f}{s[k]['median'] / d[k]['median']:>7.2f}")
print(f"{'total_s':<18}{s['total_s']:>10.2f}{d['total_s']:>11.2f}{s['total_s'] / d['total_s']:>7.2f}")
print(f"{'peak memory MB':<18}{s['peak_memory_mb'] or 0:>10.0f}{d['peak_memory_mb']:>11.0f}")
print(f"FLOP floor {floor_ms:.2f} ms/step: sdfix at {floor_ms / s['unet_step_ms']['median']:.0%}, diffusers at {floor_ms / d['unet_step_ms']['median']:.0%}")
PY
exit $status
