#!/usr/bin/env python3
"""A full diffusers model folder with the real architecture and random weights, for measuring
what a user's `generate` costs (loading from disk included) without downloading a checkpoint.

    .venv-oracle/bin/python scripts/make_random_model.py --arch sd2.1-base --out /tmp/sd21base-random
    .venv-oracle/bin/python scripts/make_random_model.py --arch sdxl --out /tmp/sdxl-random   # 14 GB

Configs come from models/arch/<arch> (the public config.json files), the tokenizer from
models/demo/tokenizer (the CLIP BPE vocabulary). Weights are saved as f32 safetensors, as the
public SD 2.1 repos ship them (`--fp16` adds the `*.fp16.safetensors` variant too). The images it
makes are noise; memory and time are those of the real model.
"""

import argparse
import json
import pathlib
import shutil

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sd2.1-base")
    parser.add_argument("--out", required=True, type=pathlib.Path)
    parser.add_argument("--fp16", action="store_true", help="also write the fp16 variant")
    args = parser.parse_args()
    arch = ROOT / "models" / "arch" / args.arch
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    # Built and saved one at a time: SDXL's UNet alone is 10 GB in f32.
    parts = {
        "unet": lambda: UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(arch / "unet")),
        "vae": lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(arch / "vae")),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig.from_json_file(arch / "text_encoder" / "config.json")),
    }
    sdxl = (arch / "text_encoder_2").is_dir()
    if sdxl:
        parts["text_encoder_2"] = lambda: CLIPTextModelWithProjection(
            CLIPTextConfig.from_json_file(arch / "text_encoder_2" / "config.json"))
    for name, make in parts.items():
        module = make()
        module.save_pretrained(out / name, safe_serialization=True)
        if args.fp16:
            module.to(torch.float16).save_pretrained(out / name, safe_serialization=True, variant="fp16")
        del module
    DDIMScheduler.from_config(DDIMScheduler.load_config(arch / "scheduler")).save_pretrained(out / "scheduler")
    shutil.copytree(ROOT / "models" / "demo" / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    index = json.loads((ROOT / "models" / "demo" / "model_index.json").read_text())
    if sdxl:
        # SDXL's second tokenizer pads with "!" as the demo's (OpenCLIP) does; the first pads with EOS.
        shutil.copytree(ROOT / "models" / "demo" / "tokenizer", out / "tokenizer_2", dirs_exist_ok=True)
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            path = out / "tokenizer" / name
            if path.is_file():
                values = json.loads(path.read_text())
                values["pad_token"] = "<|endoftext|>"
                path.write_text(json.dumps(values, indent=2) + "\n")
        index.update(_class_name="StableDiffusionXLPipeline", force_zeros_for_empty_prompt=True,
                     text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"])
        index.pop("safety_checker", None), index.pop("requires_safety_checker", None), index.pop("feature_extractor", None)
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
