#!/usr/bin/env python3
"""Checks sdfix's SAI-layout SDXL writer against diffusers: `sdfix convert tests/fixtures/tiny-sdxl
--out FILE.safetensors` (the tiny random SDXL as one file, the layout A1111, ComfyUI and civitai
use, marked v_pred + ztsnr), then diffusers' `StableDiffusionXLPipeline.from_single_file(FILE,
config=tests/fixtures/tiny-sdxl)` must give every weight of the folder's `from_pretrained`
exactly. Run by hand after `cargo build --release`, never in CI:

    HF_HUB_OFFLINE=1 .venv-oracle/bin/python scripts/make_sdxl_single_file.py

Writes tests/fixtures/single-file/sdxl.json: the tensor counts and the largest difference per
component (0 when the writer is right); tests/singlefile_sdxl.rs checks the file's own claims
(it runs the same convert and compares with the folder in sdfix).
"""

import json
import pathlib
import subprocess
import sys
import tempfile

import safetensors
import torch
from diffusers import StableDiffusionXLPipeline

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests" / "fixtures" / "tiny-sdxl"
OUT = ROOT / "tests" / "fixtures" / "single-file" / "sdxl.json"
SDFIX = ROOT / "target" / "release" / "sdfix"


def main():
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "tiny-sdxl.safetensors"
        subprocess.run([str(SDFIX), "convert", str(MODEL), "--out", str(path)], check=True)
        with safetensors.safe_open(str(path), "pt") as f:
            keys = set(f.keys())
        single = StableDiffusionXLPipeline.from_single_file(str(path), config=str(MODEL), torch_dtype=torch.float32)
        folder = StableDiffusionXLPipeline.from_pretrained(str(MODEL), torch_dtype=torch.float32)
        report = {"file_tensors": len(keys), "marks": sorted(keys & {"v_pred", "ztsnr"}), "components": {}}
        worst = 0.0
        for name in ["unet", "vae", "text_encoder", "text_encoder_2"]:
            ours = getattr(single, name).state_dict()
            theirs = getattr(folder, name).state_dict()
            missing = sorted(set(theirs) ^ set(ours))
            missing = [k for k in missing if not k.endswith("position_ids")]
            diff = max(
                (ours[k].float() - theirs[k].float()).abs().max().item() for k in theirs if k in ours and ours[k].numel()
            )
            report["components"][name] = {"tensors": len(theirs), "max_abs_diff": diff, "unmatched": missing}
            worst = max(worst, diff)
            print(f"{name}: {len(theirs)} tensors, max |diff| {diff:.3g}, unmatched {missing[:5]}")
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {OUT}")
    if worst != 0.0:
        sys.exit("the single file does not load to the folder's weights")


if __name__ == "__main__":
    main()
