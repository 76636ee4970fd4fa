#!/usr/bin/env python3
"""Reference runs of diffusers' StableDiffusionPipeline with its Euler, Euler-ancestral,
DPM-Solver++ and UniPC schedulers on the tiny fixture model, for tests/samplers.rs. Run by hand after
scripts/make_fixtures.py, never in CI:

    .venv-oracle/bin/python scripts/make_sampler_refs.py

Every scheduler is built from the model's DDIM config with rescale_betas_zero_snr=True (unless a
case turns it off), timestep_spacing="trailing", v-prediction and final_sigmas_type="zero"; sdfix
runs them with `--terminal-alpha-bar diffusers`, since these schedulers replace alpha_bar_T = 0
with 2^-24. Deterministic cases store diffusers' final latents and 8-bit images; the stochastic
samplers (their noise comes from torch) store final latents of STOCHASTIC_IMAGES images for a
comparison of statistics. Writes tests/fixtures/refs/samplers.safetensors (with the library
versions in its metadata) and tests/fixtures/refs/samplers.json (each case's sdfix arguments).
RANGE_CASES (Euler with Karras / exponential ramps on the stock schedule and with `--sigma-range
spacing`) come last, so the initial latents of the cases before them do not move.

The initial latents z given to sdfix are VP latents (x_T = z). diffusers' Euler-type schedulers
keep x / alpha and multiply given latents by `init_noise_sigma`, which for trailing spacing is
sigma_max rather than sqrt(sigma_max^2 + 1): we hand them z * sqrt(sigma_max^2 + 1) /
init_noise_sigma, so that their UNet input at t = T is z too (docs/compatibility.md, "Where sdfix departs from
diffusers").
"""

import json
import pathlib

import numpy as np

import diffusers
import safetensors.torch
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests" / "fixtures" / "tiny-sd"
REFS = ROOT / "tests" / "fixtures" / "refs"
SEED = 4321
STOCHASTIC_IMAGES = 16

DPM = dict(algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero")
SDE = dict(algorithm_type="sde-dpmsolver++", solver_order=2, final_sigmas_type="zero")
UNIPC = dict(solver_type="bh2", solver_order=2, predict_x0=True, disable_corrector=[], final_sigmas_type="zero")
BLACK = dict(prompt="solid black background", guidance_scale=7.5, guidance_rescale=0.7)
EPSILON = dict(prediction_type="epsilon", rescale_betas_zero_snr=False)

# name: (sdfix arguments, scheduler class, scheduler overrides, pipeline arguments, batch, h, w)
CASES = {
    "euler_all_fixes": (
        ["--prompt", "solid black background", "--steps", "10", "--sampler", "euler"],
        EulerDiscreteScheduler, {}, dict(BLACK, num_inference_steps=10), 2, 8, 8,
    ),
    "euler_no_cfg_20": (
        ["--prompt", "a white background", "--steps", "20", "--guidance", "1", "--sampler", "euler"],
        EulerDiscreteScheduler, {}, dict(prompt="a white background", num_inference_steps=20, guidance_scale=1.0),
        1, 8, 8,
    ),
    "euler_epsilon_no_zero_snr": (
        ["--prompt", "a blue square", "--steps", "10", "--sampler", "euler", "--prediction", "epsilon", "--no-zero-snr"],
        EulerDiscreteScheduler, EPSILON, dict(prompt="a blue square", num_inference_steps=10, guidance_scale=7.5, guidance_rescale=0.7),
        1, 8, 8,
    ),
    "dpmpp_2m_all_fixes": (
        ["--prompt", "solid black background", "--steps", "10", "--sampler", "dpmpp_2m"],
        DPMSolverMultistepScheduler, DPM, dict(BLACK, num_inference_steps=10), 2, 8, 8,
    ),
    "dpmpp_2m_non_square_25": (
        ["--prompt", "a red circle", "--negative-prompt", "blurry", "--steps", "25", "--sampler", "dpmpp_2m"],
        DPMSolverMultistepScheduler, DPM,
        dict(prompt="a red circle", negative_prompt="blurry", num_inference_steps=25, guidance_scale=7.5, guidance_rescale=0.7),
        1, 8, 12,
    ),
    "dpmpp_2m_epsilon_no_zero_snr": (
        ["--prompt", "a blue square", "--steps", "10", "--sampler", "dpmpp_2m", "--prediction", "epsilon", "--no-zero-snr"],
        DPMSolverMultistepScheduler, dict(DPM, **EPSILON),
        dict(prompt="a blue square", num_inference_steps=10, guidance_scale=7.5, guidance_rescale=0.7),
        1, 8, 8,
    ),
    "unipc_all_fixes": (
        ["--prompt", "solid black background", "--steps", "10", "--sampler", "unipc"],
        UniPCMultistepScheduler, UNIPC, dict(BLACK, num_inference_steps=10), 2, 8, 8,
    ),
    "unipc_non_square_25": (
        ["--prompt", "a red circle", "--negative-prompt", "blurry", "--steps", "25", "--sampler", "unipc"],
        UniPCMultistepScheduler, UNIPC,
        dict(prompt="a red circle", negative_prompt="blurry", num_inference_steps=25, guidance_scale=7.5, guidance_rescale=0.7),
        1, 8, 12,
    ),
    "unipc_epsilon_no_zero_snr": (
        ["--prompt", "a blue square", "--steps", "10", "--sampler", "unipc", "--prediction", "epsilon", "--no-zero-snr"],
        UniPCMultistepScheduler, dict(UNIPC, **EPSILON),
        dict(prompt="a blue square", num_inference_steps=10, guidance_scale=7.5, guidance_rescale=0.7),
        1, 8, 8,
    ),
    # diffusers' Euler takes a Karras ramp's sigma_min from the last timestep of the spacing;
    # main() sets its `sigma_min` config to sigma(t = 0), the k-diffusion convention sdfix follows.
    "euler_karras": (
        ["--prompt", "solid black background", "--steps", "10", "--sampler", "euler", "--sigmas", "karras"],
        EulerDiscreteScheduler, dict(use_karras_sigmas=True), dict(BLACK, num_inference_steps=10), 1, 8, 8,
    ),
}

# Made after every other case (their initial latents stay as they were), with run() like CASES.
# The first sets the Karras ramp's sigma_min to sigma(t = 0) as euler_karras does, on the stock
# schedule; the `--sigma-range spacing` ones leave diffusers' Euler at its defaults (the ramp
# between the sigmas of the first and last spaced timesteps), which that flag reproduces.
# name: (sdfix arguments, scheduler overrides, pipeline arguments, sigma_min = sigma(t = 0)?)
STOCK = dict(rescale_betas_zero_snr=False)
RANGE_CASES = {
    "euler_karras_stock": (
        ["--prompt", "solid black background", "--steps", "10", "--sampler", "euler", "--sigmas", "karras",
         "--no-zero-snr"],
        dict(STOCK, use_karras_sigmas=True), dict(BLACK, num_inference_steps=10), True,
    ),
    "euler_karras_spacing": (
        ["--prompt", "solid black background", "--steps", "10", "--sampler", "euler", "--sigmas", "karras",
         "--sigma-range", "spacing"],
        dict(use_karras_sigmas=True), dict(BLACK, num_inference_steps=10), False,
    ),
    "euler_karras_stock_spacing": (
        ["--prompt", "a red circle", "--steps", "14", "--sampler", "euler", "--sigmas", "karras",
         "--sigma-range", "spacing", "--no-zero-snr"],
        dict(STOCK, use_karras_sigmas=True),
        dict(prompt="a red circle", num_inference_steps=14, guidance_scale=7.5, guidance_rescale=0.7), False,
    ),
    # leading spacing (steps_offset 1) never visits t = T: both ends of the ramp move.
    "euler_exponential_leading_spacing": (
        ["--prompt", "solid black background", "--steps", "10", "--sampler", "euler", "--sigmas", "exponential",
         "--sigma-range", "spacing", "--spacing", "leading"],
        dict(use_exponential_sigmas=True, timestep_spacing="leading"), dict(BLACK, num_inference_steps=10), False,
    ),
}

# Statistics only: diffusers draws the per-step noise from torch.
STOCHASTIC = {
    "euler_a_stats": (
        ["--prompt", "solid black background", "--steps", "10", "--sampler", "euler_a"],
        EulerAncestralDiscreteScheduler, {}, dict(BLACK, num_inference_steps=10),
    ),
    "dpmpp_2m_sde_stats": (
        ["--prompt", "solid black background", "--steps", "10", "--sampler", "dpmpp_2m_sde"],
        DPMSolverMultistepScheduler, SDE, dict(BLACK, num_inference_steps=10),
    ),
}


# Karras and exponential noise levels (DPM-Solver++ 2M): the reference is a loop over diffusers'
# own parts (UNet, text embeddings, DPMSolverMultistepScheduler's sigmas and step) that gives the
# UNet each sigma's fractional timestep, as k-diffusion and diffusers' Euler do; diffusers' DPM
# pipeline gives it round(t) for karras and floor(t) (an int64 cast) for exponential, while
# stepping with the unrounded sigma. name: (sdfix arguments, scheduler overrides, prompt, steps)
RAMPS = {
    "dpmpp_2m_karras": (
        ["--prompt", "solid black background", "--steps", "10", "--sampler", "dpmpp_2m", "--sigmas", "karras"],
        dict(DPM, use_karras_sigmas=True), "solid black background", 10,
    ),
    "dpmpp_2m_exponential": (
        ["--prompt", "a red circle", "--steps", "12", "--sampler", "dpmpp_2m", "--sigmas", "exponential"],
        dict(DPM, use_exponential_sigmas=True), "a red circle", 12,
    ),
}


@torch.no_grad()
def fractional_timestep_reference(pipe, base_config, overrides, prompt, steps, latents, guidance=7.5, phi=0.7):
    config = dict(base_config, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                  prediction_type="v_prediction", **overrides)
    scheduler = DPMSolverMultistepScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    alphas = scheduler.alphas_cumprod.double().numpy()
    log_sigmas = np.log(((1 - alphas) / alphas) ** 0.5)
    fractional = [float(scheduler._sigma_to_t(np.array(float(s)), log_sigmas)) for s in scheduler.sigmas[:-1]]
    cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True, "")
    context = torch.cat([uncond, cond])
    for t, t_model in zip(scheduler.timesteps, fractional):
        out = pipe.unet(torch.cat([latents, latents]), torch.tensor(t_model, dtype=torch.float32),
                        encoder_hidden_states=context).sample
        out_uncond, out_cond = out.chunk(2)
        out = rescale_noise_cfg(out_uncond + guidance * (out_cond - out_uncond), out_cond, guidance_rescale=phi)
        latents = scheduler.step(out, t, latents).prev_sample
    return latents


def to_uint8(pipe: StableDiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def run(pipe, base_config, scheduler_class, overrides, call, initial, generator=None):
    """diffusers' pipeline from VP latents `initial` (see the module doc for the scaling)."""
    config = dict(base_config, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                  prediction_type="v_prediction", final_sigmas_type="zero")
    config.update(overrides)
    pipe.scheduler = scheduler_class.from_config(config)
    pipe.scheduler.set_timesteps(call["num_inference_steps"])
    sigma_max = float(pipe.scheduler.sigmas.max()) if hasattr(pipe.scheduler, "sigmas") else 0.0
    scale = 1.0
    if scheduler_class not in (DPMSolverMultistepScheduler, UniPCMultistepScheduler):
        scale = (sigma_max**2 + 1) ** 0.5 / float(pipe.scheduler.init_noise_sigma)
    batch, _, h, w = initial.shape
    return pipe(
        **call, latents=initial.clone() * scale, num_images_per_prompt=batch,
        height=h * 2, width=w * 2, output_type="latent", generator=generator,
    ).images


@torch.no_grad()
def main() -> None:
    generator = torch.Generator().manual_seed(SEED)
    pipe = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    base_config = dict(pipe.scheduler.config)
    tensors, cases = {}, {}
    alpha_0 = float(pipe.scheduler.alphas_cumprod[0])
    sigma_0 = ((1 - alpha_0) / alpha_0) ** 0.5
    for name, (args, scheduler_class, overrides, call, batch, h, w) in CASES.items():
        if scheduler_class is EulerDiscreteScheduler and overrides.get("use_karras_sigmas"):
            overrides = dict(overrides, sigma_min=sigma_0)
        initial = torch.randn((batch, 4, h, w), generator=generator)
        final = run(pipe, base_config, scheduler_class, overrides, call, initial)
        tensors[f"{name}.initial"] = initial
        tensors[f"{name}.final"] = final
        tensors[f"{name}.image"] = to_uint8(pipe, final)
        cases[name] = args + ["--terminal-alpha-bar", "diffusers"]
        print(f"{name}: final latents mean {final.mean():.4f} std {final.std():.4f}")
    for name, (args, overrides, prompt, steps) in RAMPS.items():
        initial = torch.randn((1, 4, 8, 8), generator=generator)
        final = fractional_timestep_reference(pipe, base_config, overrides, prompt, steps, initial.clone())
        tensors[f"{name}.initial"] = initial
        tensors[f"{name}.final"] = final
        tensors[f"{name}.image"] = to_uint8(pipe, final)
        cases[name] = args + ["--terminal-alpha-bar", "diffusers"]
        print(f"{name}: final latents mean {final.mean():.4f} std {final.std():.4f}")
    for name, (args, scheduler_class, overrides, call) in STOCHASTIC.items():
        initial = torch.randn((STOCHASTIC_IMAGES, 4, 8, 8), generator=generator)
        final = run(pipe, base_config, scheduler_class, overrides, call, initial, generator=generator)
        tensors[f"{name}.initial"] = initial
        tensors[f"{name}.final"] = final
        cases[name] = args + ["--terminal-alpha-bar", "diffusers", "--batch-size", str(STOCHASTIC_IMAGES)]
        print(f"{name}: final latents mean {final.mean():.4f} std {final.std():.4f}")
    for name, (args, overrides, call, sigma_min_at_0) in RANGE_CASES.items():
        if sigma_min_at_0:
            # sigma(t = 0) of the case's own schedule (stock or zero-SNR: alpha_bar_0 is the same).
            stock = EulerDiscreteScheduler.from_config(dict(base_config, **overrides))
            a0 = float(stock.alphas_cumprod[0])
            overrides = dict(overrides, sigma_min=((1 - a0) / a0) ** 0.5)
        initial = torch.randn((1, 4, 8, 8), generator=generator)
        final = run(pipe, base_config, EulerDiscreteScheduler, overrides, call, initial)
        tensors[f"{name}.initial"] = initial
        tensors[f"{name}.final"] = final
        tensors[f"{name}.image"] = to_uint8(pipe, final)
        cases[name] = args + ["--terminal-alpha-bar", "diffusers"]
        print(f"{name}: final latents mean {final.mean():.4f} std {final.std():.4f}")
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        REFS / "samplers.safetensors",
        metadata=dict(generator="scripts/make_sampler_refs.py", diffusers=diffusers.__version__, torch=torch.__version__),
    )
    (REFS / "samplers.json").write_text(json.dumps(cases, indent=1) + "\n")
    print(f"wrote {len(cases)} cases (diffusers {diffusers.__version__}, torch {torch.__version__})")


if __name__ == "__main__":
    main()
