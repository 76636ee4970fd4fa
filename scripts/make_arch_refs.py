#!/usr/bin/env python3
"""Every tensor name and shape of the real SD 1.5 / 2.1-base / 2.1 modules, per diffusers and
transformers, for tests/architectures.rs.

Run by hand, never in CI (needs torch, diffusers, transformers):

    .venv-oracle/bin/python scripts/make_arch_refs.py

Builds each module from models/arch/<name>/<component>/config.json on torch's meta device (no
memory, no weights) and writes tests/fixtures/refs/arch_shapes.json.
"""

import json
import pathlib

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

ROOT = pathlib.Path(__file__).resolve().parent.parent
ARCH = ROOT / "models" / "arch"
OUT = ROOT / "tests" / "fixtures" / "refs" / "arch_shapes.json"


def shapes(module: torch.nn.Module) -> dict:
    return {name: list(t.shape) for name, t in module.state_dict().items()}


def main() -> None:
    result = dict(
        generator="scripts/make_arch_refs.py",
        versions=dict(diffusers=diffusers.__version__, transformers=transformers.__version__),
        archs={},
    )
    for arch in sorted(p.name for p in ARCH.iterdir() if p.is_dir()):
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(ARCH / arch / "unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(ARCH / arch / "vae"))
            clip = CLIPTextModel(CLIPTextConfig.from_json_file(ARCH / arch / "text_encoder" / "config.json"))
        result["archs"][arch] = dict(unet=shapes(unet), vae=shapes(vae), text_encoder=shapes(clip))
        counts = {k: len(v) for k, v in result["archs"][arch].items()}
        print(arch, counts)
    OUT.write_text(json.dumps(result, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
