#!/usr/bin/env python3
"""Reference runs of diffusers' StableDiffusionPipeline (DDIMScheduler) on the tiny fixture model,
for tests/generate.rs. Run by hand after scripts/make_fixtures.py, never in CI:

    .venv-oracle/bin/python scripts/make_pipeline_refs.py

For each case: the initial latents (fed to both diffusers and `sdfix generate --latents`), the
final latents diffusers returns, and the 8-bit image it makes of them. Writes
tests/fixtures/refs/pipeline.safetensors and tests/fixtures/refs/pipeline.json (each case's sdfix
arguments).

Case `next_timestep_n7`: 7 trailing steps do not divide T = 1000, where sdfix deliberately steps to
alpha_bar of the next timestep in the schedule and diffusers to `t - T // n`. Its reference is a
loop written here with diffusers' own parts (UNet, text embeddings, alphas_cumprod,
rescale_noise_cfg) and the next-timestep rule; diffusers' own result is stored beside it.
"""

import json
import pathlib

import diffusers
import safetensors.torch
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests" / "fixtures" / "tiny-sd"
REFS = ROOT / "tests" / "fixtures" / "refs"
SEED = 1234

# name: (sdfix arguments, scheduler overrides, pipeline arguments, latent batch, latent h, w)
CASES = {
    "all_fixes": (
        ["--prompt", "solid black background", "--steps", "10"],
        {},
        dict(prompt="solid black background", num_inference_steps=10, guidance_scale=7.5, guidance_rescale=0.7),
        2, 8, 8,
    ),
    "baseline": (
        ["--prompt", "solid black background", "--steps", "10", "--baseline"],
        dict(rescale_betas_zero_snr=False, timestep_spacing="leading"),
        dict(prompt="solid black background", num_inference_steps=10, guidance_scale=7.5, guidance_rescale=0.0),
        1, 8, 8,
    ),
    "no_cfg": (
        ["--prompt", "a white background", "--steps", "20", "--guidance", "1"],
        {},
        dict(prompt="a white background", num_inference_steps=20, guidance_scale=1.0),
        1, 8, 8,
    ),
    "non_square_negative": (
        ["--prompt", "a red circle", "--negative-prompt", "blurry", "--steps", "25", "--eta", "0"],
        {},
        dict(prompt="a red circle", negative_prompt="blurry", num_inference_steps=25, guidance_scale=7.5, guidance_rescale=0.7),
        1, 8, 12,
    ),
    "epsilon_no_zero_snr": (
        ["--prompt", "a blue square", "--steps", "10", "--prediction", "epsilon", "--no-zero-snr"],
        dict(prediction_type="epsilon", rescale_betas_zero_snr=False),
        dict(prompt="a blue square", num_inference_steps=10, guidance_scale=7.5, guidance_rescale=0.7),
        1, 8, 8,
    ),
}


def to_uint8(pipe: StableDiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


@torch.no_grad()
def next_timestep_reference(pipe, latents, prompt, steps, guidance, phi):
    """DDIM (v-prediction, eta 0) with a_prev = alpha_bar of the next timestep in the list."""
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True, "")
    context = torch.cat([uncond, cond])
    alphas = scheduler.alphas_cumprod
    for i, t in enumerate(timesteps):
        out = pipe.unet(torch.cat([latents, latents]), t, encoder_hidden_states=context).sample
        out_uncond, out_cond = out.chunk(2)
        out = rescale_noise_cfg(out_uncond + guidance * (out_cond - out_uncond), out_cond, guidance_rescale=phi)
        a = alphas[t]
        a_prev = alphas[timesteps[i + 1]] if i + 1 < len(timesteps) else scheduler.final_alpha_cumprod
        x0 = a.sqrt() * latents - (1 - a).sqrt() * out
        eps = a.sqrt() * out + (1 - a).sqrt() * latents
        latents = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return latents


@torch.no_grad()
def main() -> None:
    generator = torch.Generator().manual_seed(SEED)
    pipe = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    base_config = dict(pipe.scheduler.config)
    tensors, cases = {}, {}
    for name, (args, overrides, call, batch, h, w) in CASES.items():
        pipe.scheduler = DDIMScheduler.from_config(base_config, **overrides)
        initial = torch.randn((batch, 4, h, w), generator=generator)
        final = pipe(
            **call, latents=initial.clone(), num_images_per_prompt=batch, eta=0.0,
            height=h * 2, width=w * 2, output_type="latent",
        ).images
        tensors[f"{name}.initial"] = initial
        tensors[f"{name}.final"] = final
        tensors[f"{name}.image"] = to_uint8(pipe, final)
        cases[name] = args

    pipe.scheduler = DDIMScheduler.from_config(base_config)
    initial = torch.randn((1, 4, 8, 8), generator=generator)
    ours = next_timestep_reference(pipe, initial.clone(), "a green square", 7, 7.5, 0.7)
    theirs = pipe(
        prompt="a green square", num_inference_steps=7, guidance_scale=7.5, guidance_rescale=0.7,
        latents=initial.clone(), eta=0.0, height=16, width=16, output_type="latent",
    ).images
    tensors["next_timestep_n7.initial"] = initial
    tensors["next_timestep_n7.final"] = ours
    tensors["next_timestep_n7.image"] = to_uint8(pipe, ours)
    tensors["next_timestep_n7.diffusers_final"] = theirs
    cases["next_timestep_n7"] = ["--prompt", "a green square", "--steps", "7"]

    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        REFS / "pipeline.safetensors",
        metadata=dict(generator="scripts/make_pipeline_refs.py", diffusers=diffusers.__version__, torch=torch.__version__),
    )
    (REFS / "pipeline.json").write_text(json.dumps(cases, indent=1) + "\n")
    gap = (ours - theirs).abs().max().item()
    print(f"wrote {len(cases)} cases; n=7: next-timestep rule vs diffusers' t - T//n differ by {gap:.3g} max abs")


if __name__ == "__main__":
    main()
