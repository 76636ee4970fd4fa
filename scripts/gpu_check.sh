#!/usr/bin/env bash
# One self-contained check on a GPU machine, with binaries built here by scripts/build_cuda.sh and
# the repository's fixtures; sized for 8 minutes of an H100/H200 (issue 32). Every step that fails
# is recorded and the rest still run; everything lands in one JSON, $OUT/gpu_check.json.
# 1. nvidia-smi and the CUDA libraries found;
# 2. `sdfix kernel-check` per binary: each of our kernels (lever 4's group norm and GEGLU, lever
#    3's flash attention, lever 2's cuDNN convolution) against candle's composite op in
#    f32/f16/bf16 (attention f16/bf16) with both times, and
#    lever 6's bf16 VAE decode against the f32 decode (pixels within 2/255);
# 3. the tiny-model parity cases on CUDA against the committed diffusers (f32) references, in f32
#    and f16 with the defaults, then f16 with every lever on: final latents within 1e-3 (f32) /
#    5e-2 (f16) of max |reference|, pixels within 2/255 (f32) / 8/255 (f16);
# 4. sdfix bench and scripts/bench_diffusers.py, SD 2.1-base 512x512 f16 20 steps, same card, same
#    run; peak device memory as each tool reports it and as nvidia-smi sees the process;
# 5. each lever switch alone, then all on, on the first binary (same bench), an op profile of a
#    step (defaults; every lever but graphs), then lever 1's;
# 6. SDXL 1024x1024 and bf16 when time allows; with TRAIN=1 one fine-tuning step against PyTorch;
#    then, when time allows, our kernels' small cases under compute-sanitizer's memcheck;
# 7. a table, and the JSON.
#
#   SDFIX="target-cudnn/release/sdfix target-cuda/release/sdfix" OUT=/some/dir bash scripts/gpu_check.sh
#
# To carry both binaries (64 MiB in all): `xz -T0 -6 -k target-*/release/sdfix`, carry the .xz
# files (and a diffusers wheel); the script unpacks them.
#
# The first binary in SDFIX runs the kernel checks, the parity cases and the lever runs (the
# cudnn build has every lever); every one is benchmarked with the defaults. Needs python3 with
# torch, diffusers, transformers, safetensors, numpy and pillow (PYTHON to pick another).
# CPU_ONLY=1 runs only what needs no GPU (the script's own plumbing and the JSON), for a dry run.
set -uo pipefail
cd "$(dirname "$0")/.."
read -r -a binaries <<<"${SDFIX:-target-cuda/release/sdfix}"
PYTHON=${PYTHON:-python3}
out=${GPU_CHECK_OUT:-outputs/gpu-check}
json_out=${OUT:-$out}
mkdir -p "$out" "$json_out"
site=$("$PYTHON" -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null || true)
export LD_LIBRARY_PATH=$site/nvidia/cu13/lib:$site/nvidia/cudnn/lib:${LD_LIBRARY_PATH:-}
status=0
: >"$out/failures.txt"
# The carry limit is 64 MiB: two binaries fit only compressed (xz -6: ~19 MB each, gzip ~32 MB).
# A binary given as PATH that exists only as PATH.xz is unpacked here (python's lzma, no xz needed).
for bin in "${binaries[@]}"; do
  if [ ! -x "$bin" ] && [ -f "$bin.xz" ]; then
    "$PYTHON" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$bin.xz" "$bin" && chmod +x "$bin"
  fi
done
# Records a failed step (name) and keeps going.
failed() { echo "FAILED: $1" | tee -a "$out/failures.txt" >&2; status=1; }

# The levers of issue 32 (src/kernels/cuda_settings.rs), each off by default.
levers=(SDFIX_CUDA_FLASH_ATTENTION SDFIX_CUDA_FUSED_NORM SDFIX_CUDA_VAE_BF16 SDFIX_CUDA_CUDNN_CONV SDFIX_CUDA_GRAPHS)
all_on="${levers[*]/%/=1}"

if [ -z "${CPU_ONLY:-}" ]; then
  echo "== 1. machine"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/machine.txt"
  "$PYTHON" -c 'import torch, diffusers, transformers; print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__)' | tee -a "$out/machine.txt"
  for lib in libcuda.so.1 libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudnn.so.9; do
    found=$(ldconfig -p | grep -m1 "$lib" | awk '{print $NF}')
    [ -z "$found" ] && found=$(ls "$site"/nvidia/cu13/lib/$lib "$site"/nvidia/cudnn/lib/$lib 2>/dev/null | head -n 1)
    printf '%-20s %s\n' "$lib" "${found:-not found}" | tee -a "$out/machine.txt"
  done
  usable=()
  for bin in "${binaries[@]}"; do
    if ldd "$bin" | grep "not found"; then failed "$bin: missing libraries"; else usable+=("$bin"); fi
  done
  [ "${#usable[@]}" -gt 0 ] || { echo "no usable binary" >&2; exit 1; }
  binaries=("${usable[@]}")

  echo "== 2. kernel checks (ours vs candle's composite ops; bf16 VAE vs f32)"
  i=0
  for bin in "${binaries[@]}"; do
    timeout 120 "$bin" kernel-check --device cuda | tee "$out/kernel-check-$i.jsonl" || failed "kernel-check $bin"
    i=$((i + 1))
  done
fi

# Runs the tiny-model parity cases with `env` settings; one JSON line per case to parity.jsonl.
parity() { # label dtype env-assignments...
  local label=$1 dtype=$2; shift 2
  local refs=tests/fixtures/refs
  # stem:case of tests/fixtures/refs/STEM.{json,safetensors}; the SDXL cases name their model.
  for pair in pipeline:all_fixes pipeline:baseline pipeline:no_cfg pipeline:non_square_negative \
    pipeline:epsilon_no_zero_snr sdxl:vpred_zsnr_ddim sdxl:euler sdxl:empty_negative_zeroed sdxl:micro_conditioning; do
    local stem=${pair%%:*} case=${pair#*:}
    local dir=$out/parity-$label-$stem-$case
    rm -rf "$dir"
    local args
    args=$("$PYTHON" -c "import json, shlex; a = [x.replace('fixtures:', 'tests/fixtures/') for x in json.load(open('$refs/$stem.json'))['$case']]; a = a if '--model' in a else ['--model', 'tests/fixtures/tiny-sd'] + a; print(shlex.join(a))")
    # scripts/gpu_carry.sh leaves the tiny SDXL model behind (the 64 MiB carry limit): say so.
    local model
    model=$("$PYTHON" -c "import shlex, sys; a = shlex.split(sys.argv[1]); print(a[a.index('--model') + 1])" "$args")
    if [ ! -e "$model" ]; then
      echo "{\"label\": \"$label\", \"case\": \"$stem:$case\", \"skipped\": \"$model not carried\"}" >>"$out/parity.jsonl"
      continue
    fi
    "$PYTHON" - "$refs/$stem.safetensors" "$case" "$dir/initial.safetensors" <<'PY'
import sys, safetensors.torch as st, pathlib
t = st.load_file(sys.argv[1]); pathlib.Path(sys.argv[3]).parent.mkdir(parents=True, exist_ok=True)
st.save_file({"latents": t[sys.argv[2] + ".initial"].contiguous()}, sys.argv[3])
PY
    # shellcheck disable=SC2086
    eval 'env "$@" timeout 60 "${binaries[0]}"' generate --device cuda --dtype $dtype --seed 0 --save-latents \
      --latents "$dir/initial.safetensors" --out-dir "$dir" --quiet $args || failed "parity $label $case: generate"
    "$PYTHON" - "$refs/$stem.safetensors" "$case" "$dir" "$dtype" "$label" "$out/parity.jsonl" <<'PY' || failed "parity $label $case"
import sys, glob, json, numpy as np, safetensors.torch as st
from PIL import Image
refs, case, folder, dtype, label, log = st.load_file(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
# Latents: max |ours - diffusers| / max |diffusers|; pixels: max 8-bit difference.
lat_tol, px_tol = (1e-3, 2) if dtype == "f32" else (5e-2, 8)
pngs = sorted(glob.glob(folder + "/*.png"))
row = {"label": label, "dtype": dtype, "case": case, "latents": None, "pixels": None, "ok": False}
if pngs:
    row["latents"] = max(float((st.load_file(p[:-4] + ".latents.safetensors")["latents"] - refs[case + ".final"][i]).abs().max() / refs[case + ".final"][i].abs().max()) for i, p in enumerate(pngs))
    ref_img = refs[case + ".image"].permute(0, 2, 3, 1).numpy().astype(int)
    row["pixels"] = max(int(np.abs(np.asarray(Image.open(p).convert("RGB")).astype(int) - ref_img[i]).max()) for i, p in enumerate(pngs))
    row["ok"] = row["latents"] <= lat_tol and row["pixels"] <= px_tol and bool(np.isfinite(row["latents"]))
open(log, "a").write(json.dumps(row) + "\n")
if not pngs:
    sys.exit(f"{label} {case}: no image written")
print(f"{label:<10} {case:<22} latents {row['latents']:.2e} (<= {lat_tol:g}) pixels {row['pixels']}/255 (<= {px_tol}) {'ok' if row['ok'] else 'FAIL'}")
sys.exit(0 if row["ok"] else 1)
PY
  done
}

# Runs a command while nvidia-smi samples the card's used memory every 20 ms; prints the peak
# above the level before it started, in MiB, to $1.
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
    with_smi_peak "$out/$name-sdfix$i.smi" timeout 150 "$bin" bench --json --device cuda "${args[@]}" >"$out/$name-sdfix$i.json" ||
      failed "bench $name $bin"
    i=$((i + 1))
  done
  with_smi_peak "$out/$name-diffusers.smi" timeout 150 "$PYTHON" scripts/bench_diffusers.py --device cuda "${args[@]}" >"$out/$name-diffusers.json" ||
    failed "bench $name diffusers"
}

# One bench of the first binary with `assign` (space-separated VAR=1 settings), to lever-LABEL.json.
lever() { # label assign dtype
  local label=$1 assign=$2 dtype=$3
  # shellcheck disable=SC2086
  with_smi_peak "$out/lever-$label.smi" env $assign timeout 150 "${binaries[0]}" bench --json --device cuda --arch sd2.1-base \
    --width 512 --height 512 --steps 20 --dtype "$dtype" --repeat 3 >"$out/lever-$label.json" || { failed "lever $label"; return; }
  "$PYTHON" - "$out/lever-$label.json" "$label" <<'PY' || failed "lever $label: report"
import json, sys
r = json.loads(open(sys.argv[1]).read())
print(f"{sys.argv[2]:<24} unet_step_ms {r['unet_step_ms']['median']:8.2f}  submit {r['unet_submit_ms']['median']:8.2f}  vae_decode_ms {r['vae_decode_ms']['median']:8.2f} ({r.get('vae_dtype')})  total_s {r['total_s']:6.2f}  peak MB {r['peak_memory_mb'] or 0:8.0f}")
PY
}

if [ -z "${CPU_ONLY:-}" ]; then
  echo "== 3. parity on CUDA (${binaries[0]}): defaults f32, f16; every lever on, f16"
  : >"$out/parity.jsonl"
  parity f32 f32
  parity f16 f16
  # shellcheck disable=SC2086
  parity levers-f16 f16 $all_on

  echo "== 4. benchmark: sd2.1-base 512x512, 20 steps, f16, sdfix (defaults) vs diffusers"
  bench f16-512 f16 512 20

  echo "== 5. levers, each alone then all on (${binaries[0]}, f16, 512 px, 20 steps)"
  lever defaults "SDFIX_CUDA_TF32=0" f16
  for switch in "${levers[@]}"; do
    label=$(echo "${switch#SDFIX_CUDA_}" | tr 'A-Z_' 'a-z-')
    lever "$label" "$switch=1" f16
  done
  lever all-on "$all_on" f16
  # Where a step's time goes, op by op: `bench --profile` makes each op wait for the device, so
  # its op times are the kernels' (compare them with each other, not with the runs above). Graphs
  # cannot wait inside a capture: the levers' profile runs without lever 5.
  if [ "$SECONDS" -lt "${PROFILE_BEFORE_S:-360}" ]; then
    echo "== 5b. op profile, f16 512 px (defaults; every lever but graphs)"
    for spec in "defaults|SDFIX_CUDA_TF32=0" "levers-but-graphs|${all_on//SDFIX_CUDA_GRAPHS=1/}"; do
      # shellcheck disable=SC2086
      env ${spec#*|} timeout 90 "${binaries[0]}" bench --json --device cuda --arch sd2.1-base --width 512 --height 512 \
        --steps 4 --dtype f16 --repeat 2 --profile >"$out/profile-${spec%%|*}.json" || failed "profile ${spec%%|*}"
    done
  fi
  if [ "$SECONDS" -lt "${LEVER1_BEFORE_S:-330}" ]; then
    # Lever 1 (src/kernels/cuda_settings.rs): defaults tf32=0 event_tracking=0 keep_pool=1 htod_cache=1.
    lever event-tracking-on "SDFIX_CUDA_EVENT_TRACKING=1" f16
    lever pool-release "SDFIX_CUDA_KEEP_POOL=0" f16
    lever htod-cache-off "SDFIX_CUDA_HTOD_CACHE=0" f16
    lever f32 "SDFIX_CUDA_TF32=0" f32
    lever f32-tf32 "SDFIX_CUDA_TF32=1" f32
  fi

  # SDXL base at its own size (random weights; its VAE decodes in f32, force_upcast), then bf16,
  # when time allows.
  if [ "$SECONDS" -lt "${SDXL_BEFORE_S:-380}" ]; then
    echo "== 6a. benchmark: sdxl 1024x1024, 10 steps, f16 (defaults, then every lever on)"
    bench sdxl-f16-1024 f16 1024 10 sdxl
    # shellcheck disable=SC2086
    with_smi_peak "$out/lever-sdxl-all-on.smi" env $all_on timeout 150 "${binaries[0]}" bench --json --device cuda --arch sdxl \
      --width 1024 --height 1024 --steps 10 --dtype f16 --repeat 3 >"$out/lever-sdxl-all-on.json" || failed "lever sdxl all-on"
  fi
  [ "$SECONDS" -lt "${BF16_BEFORE_S:-420}" ] && bench bf16-512 bf16 512 20

  if [ -n "${TRAIN:-}" ]; then
    # Issue 21: one fine-tuning step of SD 2.1-base (random weights, 512 px, batch 4, f32, text
    # encoder frozen) against PyTorch + diffusers in the same run; off unless TRAIN=1.
    echo "== 6b. fine-tuning step: ${binaries[0]} vs PyTorch, sd2.1-base 512 px, batch 4"
    "$PYTHON" scripts/bench_train.py --arch models/arch/sd2.1-base --size 512 --batch 4 --device cuda \
      --sdfix "${binaries[0]}" --rounds 2 --threads 16 | tee "$out/train.jsonl" || failed "train"
  fi

  # Our kernels' memory accesses checked on the card (compute-sanitizer memcheck, in the GPU image),
  # small cases only, when time remains: the CPU emulation (tests/cuda_emulation.rs) cannot see
  # what the hardware does with an out-of-range address.
  if command -v compute-sanitizer >/dev/null && [ "$SECONDS" -lt "${SANITIZER_BEFORE_S:-440}" ]; then
    echo "== 6c. compute-sanitizer memcheck: kernel-check --small (${binaries[0]})"
    timeout 60 compute-sanitizer --tool memcheck --error-exitcode 9 "${binaries[0]}" kernel-check --device cuda \
      --small >"$out/sanitizer.jsonl" 2>"$out/sanitizer.txt" || failed "compute-sanitizer memcheck (see sanitizer.txt)"
    tail -n 5 "$out/sanitizer.txt"
  fi
fi

echo "== 7. table and JSON ($json_out/gpu_check.json)"
"$PYTHON" - "$out" "$json_out/gpu_check.json" "${binaries[@]}" <<'PY' || failed "report"
import json, sys, pathlib
out, json_path, binaries = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3:]

def load(path):
    """A JSON file's content, or None when missing, empty or broken (a failed step)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None

def lines(path):
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows

def smi(path):
    try:
        return float(path.read_text())
    except (OSError, ValueError):
        return None

report = {
    "binaries": binaries,
    "machine": (out / "machine.txt").read_text() if (out / "machine.txt").exists() else None,
    "kernel_checks": {b: lines(out / f"kernel-check-{i}.jsonl") for i, b in enumerate(binaries)},
    "parity": lines(out / "parity.jsonl"),
    "bench": {},
    "levers": {},
    "train": lines(out / "train.jsonl"),
    "profiles": {p.stem[len("profile-"):]: load(p) for p in sorted(out.glob("profile-*.json"))},
    "sanitizer": {"checks": lines(out / "sanitizer.jsonl"),
                  "log_tail": (out / "sanitizer.txt").read_text()[-4000:] if (out / "sanitizer.txt").exists() else None},
    "failures": (out / "failures.txt").read_text().splitlines() if (out / "failures.txt").exists() else [],
}
# 804 GFLOP per UNet forward at 512 px, x2 for CFG; H100/H200 bf16 dense ~790 TFLOP/s measured.
floor_ms = 2 * 804e9 / 790e12 * 1000
report["flop_floor_unet_step_ms_512"] = floor_ms
for run in ("f16-512", "bf16-512", "sdxl-f16-1024"):
    names = [f"sdfix{i}" for i in range(len(binaries))] + ["diffusers"]
    res = {n: load(out / f"{run}-{n}.json") for n in names}
    if not any(res.values()):
        continue
    report["bench"][run] = {n: {"result": r, "smi_peak_mib": smi(out / f"{run}-{n}.smi")} for n, r in res.items()}
    ok = {n: r for n, r in res.items() if r}
    d = ok.get("diffusers")
    print(f"\n{run}: " + ", ".join(f"sdfix{i} = {b}" for i, b in enumerate(binaries)))
    print(f"{'':<22}" + "".join(f"{n:>12}" for n in ok) + "   ratio(s) to diffusers")
    for k in ("unet_step_ms", "unet_submit_ms", "vae_decode_ms", "text_encode_ms", "ddim_guidance_ms"):
        if any(k not in r for r in ok.values()):
            continue
        row = "".join(f"{r[k]['median']:>12.2f}" for r in ok.values())
        ratios = " ".join(f"{r[k]['median'] / d[k]['median']:.2f}" for n, r in ok.items() if d and n != "diffusers")
        print(f"{k + ' (median)':<22}{row}   {ratios}")
    print(f"{'total_s':<22}" + "".join(f"{r['total_s']:>12.2f}" for r in ok.values()))
    print(f"{'peak MB (own)':<22}" + "".join(f"{(r['peak_memory_mb'] or 0):>12.0f}" for r in ok.values()))
for path in sorted(out.glob("lever-*.json")):
    label = path.stem[len("lever-"):]
    r = load(path)
    report["levers"][label] = {"result": r, "smi_peak_mib": smi(out / f"lever-{label}.smi")}
d = (report["bench"].get("f16-512", {}).get("diffusers") or {}).get("result")
if report["levers"]:
    print(f"\nlevers (f16 512 px, {binaries[0]}); ratios to diffusers' f16-512")
    for label, entry in report["levers"].items():
        r = entry["result"]
        if not r:
            print(f"{label:<24} FAILED")
            continue
        ratio = f"{r['unet_step_ms']['median'] / d['unet_step_ms']['median']:.2f}" if d else "-"
        print(f"{label:<24} unet {r['unet_step_ms']['median']:8.2f} ms ({ratio})  vae {r['vae_decode_ms']['median']:8.2f} ms  total {r['total_s']:6.2f} s  peak {r['peak_memory_mb'] or 0:6.0f} MB")
failed_checks = [c for rows in report["kernel_checks"].values() for c in rows if not c.get("ok")]
print(f"\nkernel checks: {sum(len(r) for r in report['kernel_checks'].values())} run, {len(failed_checks)} failed")
for c in failed_checks:
    print(f"  FAILED {c['lever']}: {c['name']}: {c.get('error') or c.get('max_rel_diff')}")
for label, r in report["profiles"].items():
    if r and "op_ms" in r:
        ops = sorted(r["op_ms"]["unet_step"].items(), key=lambda kv: -kv[1])
        print(f"\nop profile {label} (UNet step, ms, each op synchronised): " + ", ".join(f"{k} {v:.2f}" for k, v in ops))
run_cases = [p for p in report["parity"] if "skipped" not in p]
print(f"parity: {len(run_cases)} cases, {sum(not p['ok'] for p in run_cases)} failed, {len(report['parity']) - len(run_cases)} skipped")
print(f"failed steps: {len(report['failures'])}")
json_path.write_text(json.dumps(report, indent=1))
print(f"wrote {json_path}")
PY
exit $status
