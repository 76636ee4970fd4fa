#!/usr/bin/env python3
"""A random LoRA on the tiny SDXL (tests/fixtures/tiny-sdxl) in two formats, and diffusers'
pipeline with it fused, for tests/sdxl_lora.rs. Run by hand, never in CI (after
scripts/make_sdxl_refs.py):

    HF_HUB_OFFLINE=1 .venv-oracle/bin/python scripts/make_sdxl_lora_refs.py

The LoRA (rank 4) is made with peft on the UNet's attention projections (to_q, to_k, to_v,
to_out.0, every transformer block, down, mid and up) and on both text encoders' attention
(q_proj, k_proj, v_proj, out_proj), lora_A and lora_B seeded random (peft starts B at zero,
which would change nothing). Written as:
- tests/fixtures/refs/sdxl-lora-peft.safetensors: diffusers' `save_lora_weights` (`unet.`,
  `text_encoder.`, `text_encoder_2.` ... `lora_A`/`lora_B`);
- tests/fixtures/refs/sdxl-lora-kohya.safetensors: kohya's SDXL names in the SAI layout, written
  here from the layout rules (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`,
  `lora_unet_middle_block_1_...`, `lora_unet_output_blocks_...`, `lora_te1_text_model_...`,
  `lora_te2_...`), `lora_down`/`lora_up` with `alpha` = rank / 2 (so up is doubled: the same
  update, and the alpha / rank scale is exercised).

Each file is loaded with diffusers' `load_lora_weights` and fused (`fuse_lora`, lora_scale 0.8)
into a fresh pipeline, which runs sdxl.json's `vpred_zsnr_ddim` settings from stored initial
latents. The two formats must land within 1e-5 of each other (diffusers converts kohya's names
itself: an independent check of the SAI names written here). Writes
tests/fixtures/refs/sdxl_lora.{safetensors,json}: per case the initial latents, final latents and
8-bit image, and sdfix's arguments (`--lora FILE:0.8`).
"""

import json
import pathlib
import re

import diffusers
import safetensors.torch
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
MODEL = FIXTURES / "tiny-sdxl"
REFS = FIXTURES / "refs"
SEED = 20260302
RANK = 4
WEIGHT = 0.8
SCALE_A, SCALE_B = 0.3, 0.3
LAYERS_PER_BLOCK = 2
PROMPT = "solid black background"
NEGATIVE = "blurry, low quality"
CALL = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=5.0, guidance_rescale=0.7)
SDFIX_ARGS = ["--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--steps", "10", "--guidance", "5",
              "--width", "32", "--height", "32", "--model", "fixtures:tiny-sdxl"]


def pipeline() -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(MODEL)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_lora() -> dict:
    """Random LoRA layers by component, peft's names (`...to_q.lora_A.weight`)."""
    pipe = pipeline()
    pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    text = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    pipe.text_encoder.add_adapter(text)
    pipe.text_encoder_2.add_adapter(text)
    generator = torch.Generator().manual_seed(SEED)
    layers = {}
    for name in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name)
        with torch.no_grad():
            for key, p in module.named_parameters():
                if "lora_A" in key:
                    p.copy_(torch.randn(p.shape, generator=generator) * SCALE_A)
                elif "lora_B" in key:
                    p.copy_(torch.randn(p.shape, generator=generator) * SCALE_B)
        layers[name] = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(module).items()}
    return layers


def sai_unet_module(path: str) -> str:
    """A diffusers UNet attention module path in SAI/LDM numbering (`convert_ldm_unet_checkpoint`
    read backwards: input block 1 + level x (layers + 1) + index, output block level x (layers + 1)
    + index, the mid block's attention is middle_block.1)."""
    step = LAYERS_PER_BLOCK + 1
    m = re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", path)
    if m:
        return f"input_blocks.{1 + int(m[1]) * step + int(m[2])}.1.{m[3]}"
    m = re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", path)
    if m:
        return f"output_blocks.{int(m[1]) * step + int(m[2])}.1.{m[3]}"
    m = re.match(r"mid_block\.attentions\.0\.(.*)", path)
    if m:
        return f"middle_block.1.{m[1]}"
    raise ValueError(f"no SAI name for {path}")


def kohya(layers: dict) -> dict:
    out = {}
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    for component, state in layers.items():
        for key, tensor in state.items():
            path, part = re.match(r"(.*)\.(lora_[AB])\.weight", key).groups()
            if component == "unet":
                path = sai_unet_module(path)
            elif not path.startswith("text_model."):
                path = "text_model." + path
            name = prefixes[component] + path.replace(".", "_")
            if part == "lora_A":
                out[f"{name}.lora_down.weight"] = tensor
                out[f"{name}.alpha"] = torch.tensor(RANK / 2)
            else:
                # alpha / rank = 1/2: the doubled up gives the same update.
                out[f"{name}.lora_up.weight"] = tensor * 2
    return out


def to_uint8(vae, latents: torch.Tensor) -> torch.Tensor:
    image = vae.decode(latents / vae.config.scaling_factor).sample
    return ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


@torch.no_grad()
def main() -> None:
    layers = make_lora()
    peft_path = REFS / "sdxl-lora-peft.safetensors"
    kohya_path = REFS / "sdxl-lora-kohya.safetensors"
    StableDiffusionXLPipeline.save_lora_weights(
        REFS, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"], weight_name=peft_path.name,
    )
    safetensors.torch.save_file(kohya(layers), kohya_path)
    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(SEED + 1))
    tensors, cases = {}, {}
    for name, path in (("peft", peft_path), ("kohya", kohya_path)):
        pipe = pipeline()
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"], lora_scale=WEIGHT)
        final = pipe(**CALL, latents=noise.clone(), height=32, width=32, output_type="latent").images
        tensors[f"{name}.initial"] = noise.clone()
        tensors[f"{name}.final"] = final
        tensors[f"{name}.image"] = to_uint8(pipe.vae, final)
        cases[name] = SDFIX_ARGS + ["--lora", f"fixtures:refs/{path.name}:{WEIGHT}"]
    plain = pipeline()(**CALL, latents=noise.clone(), height=32, width=32, output_type="latent").images
    gap = (tensors["peft.final"] - tensors["kohya.final"]).abs().max().item()
    effect = (tensors["peft.final"] - plain).abs().max().item()
    print(f"peft vs kohya in diffusers: {gap:.2e}; the LoRA moves the final latents by {effect:.3f}")
    assert gap < 1e-5, "diffusers reads the kohya SAI names differently"
    assert effect > 0.05, "the LoRA changes too little to test"
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in tensors.items()}, REFS / "sdxl_lora.safetensors",
        metadata=dict(generator="scripts/make_sdxl_lora_refs.py", diffusers=diffusers.__version__),
    )
    (REFS / "sdxl_lora.json").write_text(json.dumps(cases, indent=1) + "\n")
    print(f"wrote {len(cases)} cases")


if __name__ == "__main__":
    main()
