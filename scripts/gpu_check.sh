#!/usr/bin/env bash
# One self-contained check on a GPU machine, with binaries built here by scripts/build_cuda.sh and
# the repository's fixtures (about 5 minutes on an H100/H200):
# 1. nvidia-smi and the CUDA libraries found;
# 2. the tiny-model parity cases on CUDA in f32 and f16 against the committed diffusers (f32)
#    references: final latents within 1e-3 (f32) / 5e-2 (f16) of max |reference|, pixels within
#    2/255 (f32) / 8/255 (f16);
# 3. sdfix bench and scripts/bench_diffusers.py, same settings, same card, same run, alternating;
#    peak device memory both as each tool reports it and as nvidia-smi sees the process;
# 4. a table: per-step ms, end-to-end s, peak memory, ratio to diffusers, fraction of the FLOP floor;
# with TRAIN=1 also one fine-tuning step against PyTorch (scripts/bench_train.py, issue 21).
#
#   SDFIX="target-cudnn/release/sdfix target-cuda/release/sdfix" bash scripts/gpu_check.sh
#
# The first binary in SDFIX runs the parity cases; every one is benchmarked. Needs python3 with
# torch, diffusers, transformers, safetensors, numpy and pillow (PYTHON to pick another).
set -uo pipefail
cd "$(dirname "$0")/.."
read -r -a binaries <<<"${SDFIX:-target-cuda/release/sdfix}"
PYTHON=${PYTHON:-python3}
out=${GPU_CHECK_OUT:-outputs/gpu-check}
mkdir -p "$out"
site=$("$PYTHON" -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null || true)
export LD_LIBRARY_PATH=$site/nvidia/cu13/lib:$site/nvidia/cudnn/lib:${LD_LIBRARY_PATH:-}
status=0

echo "== 1. machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
"$PYTHON" -c 'import torch, diffusers, transformers; print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__)'
for lib in libcuda.so.1 libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudnn.so.9; do
  found=$(ldconfig -p | grep -m1 "$lib" | awk '{print $NF}')
  [ -z "$found" ] && found=$(ls "$site"/nvidia/cu13/lib/$lib "$site"/nvidia/cudnn/lib/$lib 2>/dev/null | head -n 1)
  printf '%-20s %s\n' "$lib" "${found:-not found}"
done
for bin in "${binaries[@]}"; do
  if ldd "$bin" | grep "not found"; then echo "$bin: missing libraries"; exit 1; fi
done

echo "== 2. parity on CUDA (${binaries[0]})"
refs=tests/fixtures/refs
for dtype in f32 f16; do
  # stem:case of tests/fixtures/refs/STEM.{json,safetensors}; the SDXL cases name their model.
  for pair in pipeline:all_fixes pipeline:baseline pipeline:no_cfg pipeline:non_square_negative \
    pipeline:epsilon_no_zero_snr sdxl:vpred_zsnr_ddim sdxl:euler sdxl:empty_negative_zeroed sdxl:micro_conditioning; do
    stem=${pair%%:*} case=${pair#*:}
    dir=$out/parity-$dtype-$stem-$case
    rm -rf "$dir"
    args=$("$PYTHON" -c "import json, shlex; a = [x.replace('fixtures:', 'tests/fixtures/') for x in json.load(open('$refs/$stem.json'))['$case']]; a = a if '--model' in a else ['--model', 'tests/fixtures/tiny-sd'] + a; print(shlex.join(a))")
    "$PYTHON" - "$refs/$stem.safetensors" "$case" "$dir/initial.safetensors" <<'PY'
import sys, safetensors.torch as st, pathlib
t = st.load_file(sys.argv[1]); pathlib.Path(sys.argv[3]).parent.mkdir(parents=True, exist_ok=True)
st.save_file({"latents": t[sys.argv[2] + ".initial"].contiguous()}, sys.argv[3])
PY
    # shellcheck disable=SC2086
    eval '"${binaries[0]}"' generate --device cuda --dtype $dtype --seed 0 --save-latents \
      --latents "$dir/initial.safetensors" --out-dir "$dir" --quiet $args || status=1
    "$PYTHON" - "$refs/$stem.safetensors" "$case" "$dir" "$dtype" <<'PY' || status=1
import sys, glob, numpy as np, safetensors.torch as st
from PIL import Image
refs, case, folder, dtype = st.load_file(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
# Latents: max |ours - diffusers| / max |diffusers|; pixels: max 8-bit difference.
lat_tol, px_tol = (1e-3, 2) if dtype == "f32" else (5e-2, 8)
pngs = sorted(glob.glob(folder + "/*.png"))
if not pngs:
    sys.exit(f"{dtype} {case}: no image written")
worst_lat = max(float((st.load_file(p[:-4] + ".latents.safetensors")["latents"] - refs[case + ".final"][i]).abs().max() / refs[case + ".final"][i].abs().max()) for i, p in enumerate(pngs))
ref_img = refs[case + ".image"].permute(0, 2, 3, 1).numpy().astype(int)
worst_px = max(int(np.abs(np.asarray(Image.open(p).convert("RGB")).astype(int) - ref_img[i]).max()) for i, p in enumerate(pngs))
ok = worst_lat <= lat_tol and worst_px <= px_tol
print(f"{dtype} {case:<22} latents {worst_lat:.2e} (<= {lat_tol:g}) pixels {worst_px}/255 (<= {px_tol}) {'ok' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
PY
  done
done

# Runs a command while nvidia-smi samples the card's used memory every 20 ms; prints the peak
# above the level before it started, in MiB, to $2.
with_smi_peak() {
  local peak_file=$1; shift
  local idle; idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n 1)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 20 >"$peak_file.log" &
  local smi=$!
  "$@"; local rc=$?
  kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null
  sort -n "$peak_file.log" | tail -n 1 | awk -v idle="$idle" '{print $1 - idle}' >"$peak_file"
  return $rc
}

bench() { # name dtype width steps [arch]
  local name=$1 dtype=$2 size=$3 steps=$4 arch=${5:-sd2.1-base}
  local args=(--arch "$arch" --width "$size" --height "$size" --steps "$steps" --dtype "$dtype" --repeat 3)
  local i=0
  for bin in "${binaries[@]}"; do
    with_smi_peak "$out/$name-sdfix$i.smi" "$bin" bench --json --device cuda "${args[@]}" >"$out/$name-sdfix$i.json" || status=1
    i=$((i + 1))
  done
  with_smi_peak "$out/$name-diffusers.smi" "$PYTHON" scripts/bench_diffusers.py --device cuda "${args[@]}" >"$out/$name-diffusers.json" || status=1
}

echo "== 3. benchmark: sd2.1-base 512x512, 20 steps, f16 (then bf16)"
bench f16-512 f16 512 20
# bf16 too when time allows (BF16_BEFORE_S: seconds into the script).
[ "$SECONDS" -lt "${BF16_BEFORE_S:-330}" ] && bench bf16-512 bf16 512 20

# SDXL base at its own size (random weights; its VAE decodes in f32, force_upcast), when time allows.
if [ "$SECONDS" -lt "${SDXL_BEFORE_S:-360}" ]; then
  echo "== 3a. benchmark: sdxl 1024x1024, 10 steps, f16"
  bench sdxl-f16-1024 f16 1024 10 sdxl
fi

echo "== 3b. lever 1: each CUDA switch flipped against the defaults (${binaries[0]}, f16, 512 px, 20 steps)"
# src/kernels/cuda_settings.rs: defaults tf32=0 event_tracking=0 keep_pool=1 htod_cache=1.
lever() { # label env-assignment dtype
  local label=$1 assign=$2 dtype=$3
  env $assign "${binaries[0]}" bench --json --device cuda --arch sd2.1-base --width 512 --height 512 --steps 20 \
    --dtype "$dtype" --repeat 3 >"$out/lever-$label.json" || status=1
  "$PYTHON" - "$out/lever-$label.json" "$label" <<'PY' || status=1
import json, sys
r = json.loads(open(sys.argv[1]).read())
print(f"{sys.argv[2]:<24} unet_step_ms {r['unet_step_ms']['median']:8.2f}  submit {r['unet_submit_ms']['median']:8.2f}  vae_decode_ms {r['vae_decode_ms']['median']:8.2f}  peak MB {r['peak_memory_mb'] or 0:8.0f}")
PY
}
if [ "$SECONDS" -lt "${LEVERS_BEFORE_S:-420}" ]; then
  lever defaults "SDFIX_CUDA_TF32=0" f16
  lever event-tracking-on "SDFIX_CUDA_EVENT_TRACKING=1" f16
  lever pool-release "SDFIX_CUDA_KEEP_POOL=0" f16
  lever htod-cache-off "SDFIX_CUDA_HTOD_CACHE=0" f16
  lever f32 "SDFIX_CUDA_TF32=0" f32
  lever f32-tf32 "SDFIX_CUDA_TF32=1" f32
fi

if [ -n "${TRAIN:-}" ]; then
  # Issue 21: one fine-tuning step of SD 2.1-base (random weights, 512 px, batch 4, f32, text
  # encoder frozen) against PyTorch + diffusers in the same run; off unless TRAIN=1.
  echo "== 3c. fine-tuning step: ${binaries[0]} vs PyTorch, sd2.1-base 512 px, batch 4"
  "$PYTHON" scripts/bench_train.py --arch models/arch/sd2.1-base --size 512 --batch 4 --device cuda \
    --sdfix "${binaries[0]}" --rounds 2 --threads 16 | tee "$out/train.jsonl" || status=1
fi

echo "== 4. table"
"$PYTHON" - "$out" "${binaries[@]}" <<'PY'
import json, sys, pathlib
out, binaries = pathlib.Path(sys.argv[1]), sys.argv[2:]
# 804 GFLOP per UNet forward at 512 px, x2 for CFG; H100/H200 bf16 dense ~790 TFLOP/s measured.
floor_ms = 2 * 804e9 / 790e12 * 1000
for run in ("f16-512", "bf16-512"):
    if not (out / f"{run}-diffusers.json").exists():
        continue
    names = [f"sdfix{i}" for i in range(len(binaries))] + ["diffusers"]
    res = {n: json.loads((out / f"{run}-{n}.json").read_text()) for n in names if (out / f"{run}-{n}.json").stat().st_size}
    smi = {n: float((out / f"{run}-{n}.smi").read_text() or "nan") for n in res}
    d = res.get("diffusers")
    print(f"\n{run}: " + ", ".join(f"sdfix{i} = {b}" for i, b in enumerate(binaries)))
    print(f"{'':<22}" + "".join(f"{n:>12}" for n in res) + "   ratio(s) to diffusers")
    for k in ("unet_step_ms", "unet_submit_ms", "vae_decode_ms", "text_encode_ms", "ddim_guidance_ms"):
        if any(k not in r for r in res.values()):
            continue
        row = "".join(f"{r[k]['median']:>12.2f}" for r in res.values())
        ratios = " ".join(f"{r[k]['median'] / d[k]['median']:.2f}" for n, r in res.items() if d and n != "diffusers")
        print(f"{k + ' (median)':<22}{row}   {ratios}")
    print(f"{'total_s':<22}" + "".join(f"{r['total_s']:>12.2f}" for r in res.values()) + "   " +
          " ".join(f"{r['total_s'] / d['total_s']:.2f}" for n, r in res.items() if d and n != "diffusers"))
    print(f"{'peak MB (own)':<22}" + "".join(f"{(r['peak_memory_mb'] or 0):>12.0f}" for r in res.values()))
    print(f"{'peak MiB (nvidia-smi)':<22}" + "".join(f"{smi[n]:>12.0f}" for n in res))
    print(f"{'FLOP floor share':<22}" + "".join(f"{floor_ms / r['unet_step_ms']['median']:>12.0%}" for r in res.values()))
print(f"\nFLOP floor: {floor_ms:.2f} ms per UNet step with CFG at 512 px")
PY
exit $status
