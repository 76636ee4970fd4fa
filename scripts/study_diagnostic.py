#!/usr/bin/env python3
"""The brightness study's diagnostic (docs/brightness-study.md): does the flawed demo model know
what "solid black/white background" means, and only fail because sampling starts from pure noise?

Starts DDIM (trailing: its first step is t = 999) from
  (a) pure noise, as inference always does, and
  (b) sqrt(alpha_bar_T) x0 + sqrt(1 - alpha_bar_T) noise with x0 the VAE latents of a solid black
      (or white) image: exactly what the model saw at t = T in training,
with the same noise per seed, and prints the mean Rec. 709 luminance of each as JSON.

Run by hand (needs torch + diffusers):  .venv-oracle/bin/python scripts/study_diagnostic.py [MODEL] [SEEDS]
"""

import json
import sys

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline


@torch.no_grad()
def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "models/demo-flawed"
    seeds = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    alpha_bar_t = pipe.scheduler.alphas_cumprod[-1]
    result = {"model": model, "seeds": seeds, "alpha_bar_T": float(alpha_bar_t)}
    for colour, value in (("black", -1.0), ("white", 1.0)):
        image = torch.full((1, 3, size, size), value)
        x0 = pipe.vae.encode(image).latent_dist.mean * pipe.vae.config.scaling_factor
        noise = torch.randn((seeds, *x0.shape[1:]), generator=torch.Generator().manual_seed(0))
        starts = {
            "pure_noise": noise,
            "training_signal": alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t).sqrt() * noise,
        }
        for name, latents in starts.items():
            images = pipe(
                [f"solid {colour} background"] * seeds, num_inference_steps=50, guidance_scale=7.5,
                latents=latents, output_type="np",
            ).images
            luminance = (images[..., 0] * 0.2126 + images[..., 1] * 0.7152 + images[..., 2] * 0.0722).mean(axis=(1, 2))
            result[f"{colour}_{name}"] = {"mean": float(luminance.mean()), "min": float(luminance.min()), "max": float(luminance.max())}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
