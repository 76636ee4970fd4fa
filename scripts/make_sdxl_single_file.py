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

Also writes tests/fixtures/single-file/sdxl_arch_keys.json: SDXL base 1.0's diffusers tensor names
and shapes per component (its published configs, below; modules built on the meta device, no
weights) and those configs, for the test that configs synthesised from a real SDXL file's shapes
are SDXL's.
"""

import json
import pathlib
import subprocess
import sys
import tempfile

import safetensors
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests" / "fixtures" / "tiny-sdxl"
OUT = ROOT / "tests" / "fixtures" / "single-file" / "sdxl.json"
SDFIX = ROOT / "target" / "release" / "sdfix"
ARCH_OUT = ROOT / "tests" / "fixtures" / "single-file" / "sdxl_arch_keys.json"

# stabilityai/stable-diffusion-xl-base-1.0's configs (the keys that set shapes or that sdfix
# synthesises).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=[320, 640, 1280], transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
)
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, sample_size=1024,
    scaling_factor=0.13025, force_upcast=True,
)
CLIP_COMMON = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2)
SDXL_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 hidden_act="quick_gelu", projection_dim=768, **CLIP_COMMON)
SDXL_TEXT_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   hidden_act="gelu", projection_dim=1280, **CLIP_COMMON)


def arch_keys() -> None:
    with torch.device("meta"):
        parts = dict(
            unet=UNet2DConditionModel(**SDXL_UNET),
            vae=AutoencoderKL(**SDXL_VAE),
            text_encoder=CLIPTextModel(CLIPTextConfig(**SDXL_TEXT)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2)),
        )
    keys = {
        name: sorted([k, list(v.shape)] for k, v in module.state_dict().items() if not k.endswith("position_ids"))
        for name, module in parts.items()
    }
    configs = dict(unet=SDXL_UNET, vae=SDXL_VAE, text_encoder=SDXL_TEXT, text_encoder_2=SDXL_TEXT_2)
    ARCH_OUT.write_text(json.dumps(dict(generator="scripts/make_sdxl_single_file.py", keys=keys, configs=configs)) + "\n")
    print(f"wrote {ARCH_OUT}: {', '.join(f'{n} {len(k)} tensors' for n, k in keys.items())}")


def main():
    arch_keys()
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
        # And back: `sdfix convert FILE --out DIR` (configs from the folder) loads in from_pretrained.
        back = pathlib.Path(tmp) / "back"
        subprocess.run([str(SDFIX), "convert", str(path), "--out", str(back), "--config", str(MODEL)], check=True)
        again = StableDiffusionXLPipeline.from_pretrained(str(back), torch_dtype=torch.float32)
        for name in ["unet", "vae", "text_encoder", "text_encoder_2"]:
            ours = getattr(again, name).state_dict()
            theirs = getattr(folder, name).state_dict()
            diff = max((ours[k].float() - theirs[k].float()).abs().max().item() for k in theirs if ours[k].numel())
            report["components"][name]["converted_back_max_abs_diff"] = diff
            print(f"{name} converted back: max |diff| {diff:.3g}")
            worst = max(worst, diff)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {OUT}")
    if worst != 0.0:
        sys.exit("the single file does not load to the folder's weights")


if __name__ == "__main__":
    main()
