#!/usr/bin/env python3
"""Reference runs of diffusers' tiled VAE (`vae.enable_tiling()`) on the tiny fixture model, for
tests/vae_tiling.rs. Run by hand, never in CI:

    .venv-oracle/bin/python scripts/make_vae_tiling_refs.py

tests/fixtures/tiny-sd's VAE has sample_size 16 and two blocks (factor 2), so diffusers' tiles
are 8 latent px (16 image px), stride 6 latent, blend 4 px, keep 12 px for decoding, and 16 px
tiles, stride 12 px, blend 2 latent, keep 6 latent for encoding. The cases:

- `decode_8x8`: latents of one tile, which diffusers decodes whole (it tiles only larger ones);
- `decode_12x12`: 2 x 2 tiles (the second row and column 6 latent px);
- `decode_9x13_batch2`: 2 x 3 uneven tiles, the last column one latent px wide, batch 2;
- `decode_20x13`: 4 x 3 tiles, the last row 2 latent px;
- `encode_16x16`, `encode_24x24`, `encode_18x34_batch2`: the encoder on one tile (whole), 2 x 2
  tiles, and 2 x 3 uneven tiles (the last row 6 px, the last column 10 px);
- `txt2img_40x24`, `img2img_40x24`: `sdfix generate --vae-tiling` end to end against diffusers'
  pipelines with the VAE's tiling on (img2img: tiled encode and decode; the posterior's mean and
  stored noise, as scripts/make_img2img_refs.py does).

Decode cases store sampler-scale latents (`.latents`) and the decoded images in [-1, 1]
(`.images`); encode cases the images and the posterior's `.mean` and `.std`.

Writes tests/fixtures/refs/vae_tiling.{safetensors,json} and the init picture
tests/fixtures/refs/vae_tiling_init_40x24.png.
"""

import json
import pathlib
import sys

import diffusers
import numpy as np
import safetensors.torch
import torch
from diffusers import AutoencoderKL, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
# Importing it wraps the img2img pipeline's `retrieve_latents` (the mean) and `randn_tensor`
# (stored noise), as its cases do.
from make_img2img_refs import NEXT_NOISE, pattern  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests" / "fixtures" / "tiny-sd"
REFS = ROOT / "tests" / "fixtures" / "refs"
SEED = 2048
PROMPT = "a red circle on a blue square"

DECODE = {
    "decode_8x8": (1, 8, 8),
    "decode_12x12": (1, 12, 12),
    "decode_9x13_batch2": (2, 9, 13),
    "decode_20x13": (1, 20, 13),
}
ENCODE = {
    "encode_16x16": (1, 16, 16),
    "encode_24x24": (1, 24, 24),
    "encode_18x34_batch2": (2, 18, 34),
}


def to_uint8(vae, latents: torch.Tensor) -> torch.Tensor:
    image = vae.decode(latents / vae.config.scaling_factor).sample
    return ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


@torch.no_grad()
def vae_cases(tensors: dict) -> None:
    generator = torch.Generator().manual_seed(SEED)
    vae = AutoencoderKL.from_pretrained(MODEL / "vae")
    tiled = AutoencoderKL.from_pretrained(MODEL / "vae")
    tiled.enable_tiling()
    assert (tiled.tile_sample_min_size, tiled.tile_latent_min_size) == (16, 8)
    for name, (batch, h, w) in DECODE.items():
        latents = torch.randn((batch, 4, h, w), generator=generator)
        images = tiled.decode(latents / tiled.config.scaling_factor).sample
        whole = vae.decode(latents / vae.config.scaling_factor).sample
        gap = (images - whole).abs().max().item()
        print(f"{name}: tiled vs whole {gap:.3g}")
        assert (gap == 0) == (name == "decode_8x8"), name
        tensors[f"{name}.latents"] = latents
        tensors[f"{name}.images"] = images
    for name, (batch, h, w) in ENCODE.items():
        images = torch.rand((batch, 3, h, w), generator=generator) * 2 - 1
        # Smooth, so that the tiles see a picture rather than noise.
        images = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1)
        dist = tiled.encode(images).latent_dist
        whole = vae.encode(images).latent_dist
        gap = (dist.mean - whole.mean).abs().max().item()
        print(f"{name}: tiled vs whole mean {gap:.3g}")
        assert (gap == 0) == (name == "encode_16x16"), name
        tensors[f"{name}.images"] = images
        tensors[f"{name}.mean"] = dist.mean
        tensors[f"{name}.std"] = dist.std


@torch.no_grad()
def pipeline_cases(tensors: dict, cases: dict) -> None:
    generator = torch.Generator().manual_seed(SEED + 1)
    w, h = 40, 24
    common = ["--prompt", PROMPT, "--steps", "10", "--width", str(w), "--height", str(h), "--vae-tiling"]

    pipe = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_tiling()
    initial = torch.randn((1, 4, h // 2, w // 2), generator=generator)
    final = pipe(
        prompt=PROMPT, num_inference_steps=10, guidance_scale=7.5, guidance_rescale=0.7, latents=initial.clone(),
        height=h, width=w, output_type="latent",
    ).images
    tensors["txt2img_40x24.initial"] = initial
    tensors["txt2img_40x24.final"] = final
    tensors["txt2img_40x24.image"] = to_uint8(pipe.vae, final)
    cases["txt2img_40x24"] = common

    init_path = REFS / f"vae_tiling_init_{w}x{h}.png"
    pattern(w, h, seed=w * 100 + h).save(init_path)
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_tiling()
    noise = torch.randn((1, 4, h // 2, w // 2), generator=generator)
    NEXT_NOISE[:] = [noise]
    final = pipe(
        prompt=PROMPT, image=Image.open(init_path), num_inference_steps=10, strength=0.6, guidance_scale=7.5,
        output_type="latent",
    ).images
    assert not NEXT_NOISE, "the img2img pipeline did not draw its noise"
    tensors["img2img_40x24.initial"] = noise
    tensors["img2img_40x24.final"] = final
    tensors["img2img_40x24.image"] = to_uint8(pipe.vae, final)
    # The img2img pipeline has no guidance_rescale (its **kwargs swallow it).
    cases["img2img_40x24"] = common + [
        "--init-image", f"fixtures:refs/{init_path.name}", "--vae-encode", "mean", "--strength", "0.6",
        "--guidance-rescale", "0",
    ]


def main() -> None:
    tensors, cases = {}, {}
    vae_cases(tensors)
    pipeline_cases(tensors, cases)
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        REFS / "vae_tiling.safetensors",
        metadata=dict(
            generator="scripts/make_vae_tiling_refs.py", diffusers=diffusers.__version__, torch=torch.__version__
        ),
    )
    (REFS / "vae_tiling.json").write_text(json.dumps(cases, indent=1) + "\n")
    print(f"wrote {len(tensors)} tensors, {len(cases)} pipeline cases")


if __name__ == "__main__":
    main()
