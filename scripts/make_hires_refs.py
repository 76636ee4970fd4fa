#!/usr/bin/env python3
"""References for the hires fix (tests/hires.rs). Run by hand, never in CI:

    .venv-oracle/bin/python scripts/make_hires_refs.py

Writes tests/fixtures/refs/hires.safetensors and tests/fixtures/refs/hires.json:

1. `interp.*`: torch's `F.interpolate(x, size, mode, antialias)` (align_corners left False, as
   AUTOMATIC1111's `sample_hr_pass` calls it) on random (1, 4, h, w) latents for every latent
   upscaler A1111 has (`shared.latent_upscale_modes`), at 2x, 1.5x, odd sizes and a shrink.

2. Hires-fix cases on tests/fixtures/tiny-sd. Each is A1111's txt2img hires fix rebuilt from
   diffusers' parts:
   - the first pass is `StableDiffusionPipeline` from the stored noise (`--latents`),
     `output_type="latent"`;
   - the upscale is `F.interpolate` (latent upscalers), or for `Lanczos` A1111's path: decode,
     `(x + 1) / 2` clamped, `* 255` truncated to uint8 (`astype(np.uint8)`), PIL's
     `Image.resize((W, H), Image.LANCZOS)`, `/ 255 * 2 - 1`, the VAE encoder's mean times the
     scaling factor (sdfix `--vae-encode mean`); then A1111's centre crop in latent space when both
     hires sides are given;
   - the second pass is `StableDiffusionImg2ImgPipeline` fed those latents as `image=` (a
     4-channel tensor is taken as latents as they are: `VaeImageProcessor.preprocess` and
     `prepare_latents` pass it through), its noise the stored second noise (`randn_tensor` is
     wrapped; sdfix reads it with `--hires-latents`). A1111 runs exactly S steps, the last S of a
     schedule of N = int(S / min(d, 0.999)) steps (`setup_img2img_steps`); diffusers runs
     int(N * strength) steps from index N - that, so it is called with `num_inference_steps=N` and
     `strength=(S + 0.5) / N`, which makes int(N * strength) = S: the same timestep slice.
   The img2img pipeline takes no `guidance_rescale`, so every case runs sdfix with
   `--guidance-rescale 0`. DDIM cases use N dividing T = 1000 (sdfix steps to the next listed
   timestep, diffusers to t - T // n; tests/generate.rs pins that difference).
"""

import json
import pathlib

import diffusers
import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img_module
from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as xl_img2img_module
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
MODEL = FIXTURES / "tiny-sd"
XL_MODEL = FIXTURES / "tiny-sdxl"
REFS = FIXTURES / "refs"
SEED = 2468

# A1111's latent upscalers: name -> (mode, antialias), as `shared.latent_upscale_modes`.
LATENT_MODES = {
    "latent": ("bilinear", False),
    "latent-antialiased": ("bilinear", True),
    "latent-bicubic": ("bicubic", False),
    "latent-bicubic-antialiased": ("bicubic", True),
    "latent-nearest": ("nearest", False),
    "latent-nearest-exact": ("nearest-exact", False),
}
# (h, w) -> (out_h, out_w)
SIZES = [((8, 8), (16, 16)), ((8, 12), (12, 18)), ((7, 5), (13, 11)), ((16, 16), (10, 10)), ((12, 10), (18, 15))]

NEXT_NOISE: list = []


def stored_noise(shape, generator=None, device=None, dtype=None, layout=None):
    noise = NEXT_NOISE.pop(0)
    assert tuple(noise.shape) == tuple(shape), (noise.shape, shape)
    return noise.clone().to(dtype=dtype)


img2img_module.randn_tensor = stored_noise
xl_img2img_module.randn_tensor = stored_noise

PROMPT = "a red circle on a blue square"
NEGATIVE = "blurry, low quality"
# name: (sampler, scheduler class, first steps, hires steps S (0 = first), strength d,
#        upscaler, hires size (w, h) or scale, first size (w, h) in px[, "sdxl"])
CASES = {
    # SDXL's micro-conditioning in the second pass is the hires size (diffusers' img2img takes the
    # latents' size; A1111 hr_upscale_to, the same here).
    "sdxl_ddim_latent_x1_5": ("ddim", DDIMScheduler, 10, 5, 0.5, "latent", 1.5, (32, 32), "sdxl"),
    "ddim_latent_x2": ("ddim", DDIMScheduler, 10, 5, 0.5, "latent", 2.0, (16, 16)),
    "euler_bicubic_aa_x1_5": ("euler", EulerDiscreteScheduler, 10, 0, 0.7, "latent-bicubic-antialiased", 1.5, (16, 16)),
    "ddim_nearest_exact_resize_crop": ("ddim", DDIMScheduler, 10, 4, 0.4, "latent-nearest-exact", (40, 24), (16, 16)),
    "ddim_lanczos_x2": ("ddim", DDIMScheduler, 10, 5, 0.5, "lanczos", 2.0, (24, 16)),
    # A1111's second-pass overrides (below): its own sampler, prompt and negative prompt.
    "euler_then_ddim_hires_prompts": ("euler", EulerDiscreteScheduler, 10, 5, 0.5, "latent", 2.0, (16, 16)),
}
# name: (sampler, scheduler class, prompt, negative prompt) of the second pass (A1111's
# `hr_sampler_name`, `hr_prompt`, `hr_negative_prompt`).
SECOND_PASS = {
    "euler_then_ddim_hires_prompts": ("ddim", DDIMScheduler, "a green triangle on a white square", "blurry"),
}
FACTOR = 2  # tiny-sd's VAE factor


def target(first, size):
    """A1111's calculate_target_resolution: (upscale_to_w, upscale_to_h, truncate_x, truncate_y)."""
    w, h = first
    if not isinstance(size, tuple):
        return int(w * size), int(h * size), 0, 0
    rx, ry = size
    if w / h < rx / ry:
        tw, th = rx, rx * h // w
    else:
        tw, th = ry * w // h, ry
    return tw, th, (tw - rx) // FACTOR, (th - ry) // FACTOR


def to_uint8(vae, latents):
    image = vae.decode(latents / vae.config.scaling_factor).sample
    return ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


@torch.no_grad()
def interpolation_refs(tensors, generator):
    for (h, w), (oh, ow) in SIZES:
        x = torch.randn((1, 4, h, w), generator=generator)
        tensors[f"interp.{h}x{w}.input"] = x
        for name, (mode, aa) in LATENT_MODES.items():
            tensors[f"interp.{h}x{w}.{oh}x{ow}.{name}"] = F.interpolate(x, size=(oh, ow), mode=mode, antialias=aa)


def lanczos_refs(tensors):
    """PIL's `Image.resize(size, Image.LANCZOS)` of an RGB picture: enlarging 2x, by an uneven
    factor, and shrinking."""
    rng = np.random.default_rng(5)
    y, x = np.mgrid[0:16, 0:24]
    smooth = np.stack([x * 10, y * 15, 128 + 60 * np.sin(x / 2 + y / 3)], axis=-1)
    picture = np.clip(smooth + rng.normal(0, 25, smooth.shape), 0, 255).astype(np.uint8)
    tensors["lanczos.input"] = torch.from_numpy(picture)
    for w, h in [(48, 32), (37, 23), (10, 7)]:
        out = np.array(Image.fromarray(picture).resize((w, h), resample=Image.LANCZOS))
        tensors[f"lanczos.{w}x{h}"] = torch.from_numpy(out)


@torch.no_grad()
def pipeline_refs(tensors, cases, generator):
    sd = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)
    xl = StableDiffusionXLPipeline.from_pretrained(XL_MODEL)
    pipes = {
        "sd": (sd, StableDiffusionImg2ImgPipeline(**sd.components)),
        "sdxl": (xl, StableDiffusionXLImg2ImgPipeline(**xl.components)),
    }
    for name, (sampler, scheduler_class, steps, hires_steps, d, upscaler, size, first, *family) in CASES.items():
        family = family[0] if family else "sd"
        txt2img, img2img = pipes[family]
        txt2img.set_progress_bar_config(disable=True)
        img2img.set_progress_bar_config(disable=True)
        vae = txt2img.vae
        base_config = dict(txt2img.scheduler.config)
        scheduler = scheduler_class.from_config(base_config)
        txt2img.scheduler = scheduler
        img2img.scheduler = scheduler
        second = SECOND_PASS.get(name)
        if second:
            img2img.scheduler = second[1].from_config(base_config)
        w, h = first
        noise = torch.randn((1, 4, h // FACTOR, w // FACTOR), generator=generator)
        prompts = dict(prompt=PROMPT, negative_prompt=NEGATIVE if family == "sdxl" else None, guidance_scale=7.5)
        lowres = txt2img(
            **prompts, num_inference_steps=steps, guidance_rescale=0.0,
            latents=noise.clone(), height=h, width=w, output_type="latent",
        ).images
        tw, th, tx, ty = target(first, size)
        if upscaler == "lanczos":
            decoded = vae.decode(lowres / vae.config.scaling_factor).sample
            pixels = (torch.clamp((decoded + 1.0) / 2.0, 0.0, 1.0)[0].permute(1, 2, 0).numpy() * 255.0).astype(np.uint8)
            picture = Image.fromarray(pixels).resize((tw, th), resample=Image.LANCZOS)
            image = torch.from_numpy(np.array(picture).astype(np.float32) / 255.0).permute(2, 0, 1)[None]
            upscaled = vae.encode(image * 2.0 - 1.0).latent_dist.mode() * vae.config.scaling_factor
        else:
            mode, aa = LATENT_MODES[upscaler]
            upscaled = F.interpolate(lowres, size=(th // FACTOR, tw // FACTOR), mode=mode, antialias=aa)
        upscaled = upscaled[:, :, ty // 2 : upscaled.shape[2] - (ty + 1) // 2, tx // 2 : upscaled.shape[3] - (tx + 1) // 2]
        s = hires_steps or steps
        n = int(s / min(d, 0.999))
        hires_noise = torch.randn(upscaled.shape, generator=generator)
        NEXT_NOISE[:] = [hires_noise]
        ran = []

        def count(pipe, i, t, kwargs):
            ran.append(int(t))
            return kwargs

        second_prompts = dict(prompts, prompt=second[2], negative_prompt=second[3]) if second else prompts
        final = img2img(
            **second_prompts, image=upscaled, num_inference_steps=n, strength=(s + 0.5) / n,
            output_type="latent", callback_on_step_end=count,
        ).images
        assert not NEXT_NOISE, f"{name}: the pipeline did not draw its noise"
        assert len(ran) == s, (name, ran, s)
        print(f"{name}: N = {n}, ran {s} steps at timesteps {ran}")
        tensors[f"{name}.initial"] = noise
        tensors[f"{name}.hires_initial"] = hires_noise
        tensors[f"{name}.upscaled"] = upscaled
        tensors[f"{name}.final"] = final
        tensors[f"{name}.image"] = to_uint8(vae, final)
        sized = ["--hires-scale", f"{size:g}"] if not isinstance(size, tuple) else ["--hires-size", f"{size[0]}x{size[1]}"]
        cases[name] = [
            *(["--model", "fixtures:tiny-sdxl", "--negative-prompt", NEGATIVE] if family == "sdxl" else []),
            "--prompt", PROMPT, "--steps", str(steps), "--sampler", sampler, "--guidance-rescale", "0",
            "--width", str(w), "--height", str(h), "--hires-upscaler", upscaler, "--hires-steps", str(hires_steps),
            "--hires-strength", f"{d:g}", *sized,
        ] + (["--terminal-alpha-bar", "diffusers"] if sampler != "ddim" else []) + (
            ["--vae-encode", "mean"] if upscaler == "lanczos" else []
        ) + (
            ["--hires-sampler", second[0], "--hires-prompt", second[2], "--hires-negative-prompt", second[3]]
            if second else []
        )


def main() -> None:
    generator = torch.Generator().manual_seed(SEED)
    tensors, cases = {}, {}
    interpolation_refs(tensors, generator)
    lanczos_refs(tensors)
    pipeline_refs(tensors, cases, generator)
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        REFS / "hires.safetensors",
        metadata=dict(generator="scripts/make_hires_refs.py", diffusers=diffusers.__version__, torch=torch.__version__),
    )
    (REFS / "hires.json").write_text(json.dumps(cases, indent=1) + "\n")
    print(f"wrote {len(tensors)} tensors, {len(cases)} cases")


if __name__ == "__main__":
    main()
