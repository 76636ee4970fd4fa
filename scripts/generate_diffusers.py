#!/usr/bin/env python3
"""What `sdfix generate` does, in diffusers: load a model folder, make one image, save it. The
other half of scripts/generate_compare.sh (which times both processes from start to PNG and reads
their peak RSS).

    .venv-oracle/bin/python scripts/generate_diffusers.py --model /tmp/sd21base-random --width 256 --height 256 --steps 2

Same settings as sdfix's defaults: DDIM, trailing spacing, zero-SNR betas, guidance 7.5 with
rescale 0.7, f32 on the CPU; safetensors weights (the pipeline's default loading).
"""

import argparse
import os

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt", default="solid black background")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default="diffusers.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float32, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(
        pipe.scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction"
    )
    image = pipe(
        args.prompt,
        width=args.width,
        height=args.height,
        num_inference_steps=args.steps,
        guidance_scale=7.5,
        guidance_rescale=0.7,
        generator=torch.Generator().manual_seed(args.seed),
    ).images[0]
    image.save(args.out)


if __name__ == "__main__":
    main()
