#!/usr/bin/env python3
"""Reference runs of diffusers' img2img and inpainting pipelines, its VAE encoder, and text to
image at a size that is not a multiple of the UNet's stride, on the tiny fixture models, for
tests/img2img.rs. Run by hand, never in CI:

    .venv-oracle/bin/python scripts/make_img2img_refs.py

Writes tests/fixtures/tiny-sd-inpaint/ (a 9-channel inpainting UNet with random weights; the other
components are links to tiny-sd's), and tests/fixtures/refs/img2img.{safetensors,json} plus the
init image and mask PNGs the cases read.

diffusers draws two things from its generator that sdfix draws from its own: the VAE posterior
sample and the noise added to the encoded image. To compare the rest exactly, the pipelines'
`retrieve_latents` is wrapped to take the distribution's mean (`sample_mode="argmax"`, which
`sdfix --vae-encode mean` does) and `randn_tensor` to return the noise stored here (which sdfix
reads with `--latents`). Everything else (strength to start step, add_noise, the mask's
preprocessing and blending, the 9-channel input) is diffusers' own code. Those two pipelines take
no `guidance_rescale` (their `**kwargs` swallow it), so their cases run sdfix with
`--guidance-rescale 0`; the rescale itself is the text-to-image pipeline's, tested there.

With `--full-size DIR` (a folder made by scripts/make_random_model.py --arch sd2.1-base), it
writes DIR/refs.safetensors instead: the random full-size VAE's encoding of a 128x96 image and 5
trailing steps of text to image at 128x96 (latents 16x12: 12 is not a multiple of 8), for
`SDFIX_FULL_SIZE=DIR cargo test --release --test img2img -- --ignored`.
"""

import argparse
import json
import os
import pathlib

import diffusers
import numpy as np
import safetensors.torch
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img_module
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as inpaint_module
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
MODEL = FIXTURES / "tiny-sd"
INPAINT_MODEL = FIXTURES / "tiny-sd-inpaint"
REFS = FIXTURES / "refs"
SEED = 4321

# The noise the next pipeline call draws (set per case).
NEXT_NOISE: list = []


def stored_noise(shape, generator=None, device=None, dtype=None, layout=None):
    noise = NEXT_NOISE.pop(0)
    assert tuple(noise.shape) == tuple(shape), (noise.shape, shape)
    return noise.clone().to(dtype=dtype)


def mean_latents(encoder_output, generator=None, sample_mode="sample"):
    return encoder_output.latent_dist.mode()


for module in (img2img_module, inpaint_module):
    module.randn_tensor = stored_noise
    module.retrieve_latents = mean_latents


def pattern(width: int, height: int, seed: int) -> Image.Image:
    """A smooth, colourful test picture: gradients and a disc, the same for every run."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
    disc = ((x - cx) ** 2 + (y - cy) ** 2) < (0.3 * min(width, height)) ** 2
    rgb = np.stack(
        [x / max(width - 1, 1), y / max(height - 1, 1), 0.5 + 0.4 * np.sin(x / 3 + y / 5)], axis=-1
    )
    rgb[disc] = [0.9, 0.2, 0.1]
    return Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB")


def rectangle_mask(width: int, height: int) -> Image.Image:
    """White (repaint) over the right half's middle, black (keep) elsewhere."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4 : 3 * height // 4, width // 2 :] = 255
    return Image.fromarray(mask, "L")


def to_uint8(vae, latents: torch.Tensor) -> torch.Tensor:
    image = vae.decode(latents / vae.config.scaling_factor).sample
    return ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def make_inpaint_model() -> None:
    """tiny-sd's UNet config with in_channels 9, random weights; the rest linked to tiny-sd."""
    INPAINT_MODEL.mkdir(exist_ok=True)
    config = UNet2DConditionModel.load_config(MODEL / "unet")
    config["in_channels"] = 9
    torch.manual_seed(9)
    unet = UNet2DConditionModel.from_config(config)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    unet.save_pretrained(INPAINT_MODEL / "unet")
    for part in ("scheduler", "text_encoder", "tokenizer", "vae"):
        link = INPAINT_MODEL / part
        if not link.exists():
            os.symlink(f"../tiny-sd/{part}", link)
    index = json.loads((MODEL / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionInpaintPipeline"
    (INPAINT_MODEL / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


PROMPT = "a red circle on a blue square"
# name: (pipeline kind, sdfix args, scheduler class + overrides, call arguments, (w, h), batch).
# Step counts divide T = 1000: otherwise DDIM's step target differs on purpose (sdfix steps to the
# next listed timestep, diffusers to t - T // n; tests/generate.rs pins that).
CASES = {
    "img2img_s03": (
        "img2img", ["--steps", "10", "--strength", "0.3"], (DDIMScheduler, {}),
        dict(num_inference_steps=10, strength=0.3, guidance_scale=7.5), (16, 16), 1,
    ),
    "img2img_s075_batch2": (
        "img2img", ["--steps", "20", "--strength", "0.75", "--num-images", "2"], (DDIMScheduler, {}),
        dict(num_inference_steps=20, strength=0.75, guidance_scale=7.5,
             num_images_per_prompt=2), (24, 16), 2,
    ),
    "img2img_s1": (
        "img2img", ["--steps", "10", "--strength", "1"], (DDIMScheduler, {}),
        dict(num_inference_steps=10, strength=1.0, guidance_scale=7.5), (16, 16), 1,
    ),
    "img2img_epsilon_stock": (
        "img2img",
        ["--steps", "10", "--strength", "0.6", "--prediction", "epsilon", "--baseline"],
        (DDIMScheduler, dict(prediction_type="epsilon", rescale_betas_zero_snr=False, timestep_spacing="leading")),
        dict(num_inference_steps=10, strength=0.6, guidance_scale=7.5, ), (16, 16), 1,
    ),
    "img2img_euler": (
        "img2img", ["--steps", "10", "--strength", "0.5", "--sampler", "euler", "--terminal-alpha-bar", "diffusers"],
        (EulerDiscreteScheduler, {}),
        dict(num_inference_steps=10, strength=0.5, guidance_scale=7.5), (16, 16), 1,
    ),
    "img2img_dpmpp_2m": (
        "img2img", ["--steps", "20", "--strength", "0.7", "--sampler", "dpmpp_2m", "--terminal-alpha-bar", "diffusers"],
        (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero")),
        dict(num_inference_steps=20, strength=0.7, guidance_scale=7.5), (16, 16), 1,
    ),
    "inpaint_s1": (
        "inpaint", ["--steps", "10", "--strength", "1"], (DDIMScheduler, {}),
        dict(num_inference_steps=10, strength=1.0, guidance_scale=7.5), (16, 16), 1,
    ),
    "inpaint_s06": (
        "inpaint", ["--steps", "10", "--strength", "0.6"], (DDIMScheduler, {}),
        dict(num_inference_steps=10, strength=0.6, guidance_scale=7.5), (24, 16), 1,
    ),
    "inpaint9_s1": (
        "inpaint9", ["--steps", "10", "--strength", "1"], (DDIMScheduler, {}),
        dict(num_inference_steps=10, strength=1.0, guidance_scale=7.5), (16, 16), 1,
    ),
    "inpaint9_s075": (
        "inpaint9", ["--steps", "10", "--strength", "0.75"], (DDIMScheduler, {}),
        dict(num_inference_steps=10, strength=0.75, guidance_scale=7.5), (24, 16), 1,
    ),
}


@torch.no_grad()
def tiny_cases(tensors: dict, cases: dict) -> None:
    generator = torch.Generator().manual_seed(SEED)
    pipes = {
        "img2img": StableDiffusionImg2ImgPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False),
        "inpaint": StableDiffusionInpaintPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False),
        "inpaint9": StableDiffusionInpaintPipeline.from_pretrained(
            INPAINT_MODEL, safety_checker=None, requires_safety_checker=False
        ),
    }
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    base_config = dict(pipes["img2img"].scheduler.config)
    for (w, h) in {(16, 16), (24, 16)}:
        pattern(w, h, seed=w * 100 + h).save(REFS / f"img2img_init_{w}x{h}.png")
        rectangle_mask(w, h).save(REFS / f"img2img_mask_{w}x{h}.png")
    for name, (kind, args, (scheduler_class, overrides), call, (w, h), batch) in CASES.items():
        pipe = pipes[kind]
        pipe.scheduler = scheduler_class.from_config(base_config, **overrides)
        init_path = REFS / f"img2img_init_{w}x{h}.png"
        mask_path = REFS / f"img2img_mask_{w}x{h}.png"
        noise = torch.randn((batch, 4, h // 2, w // 2), generator=generator)
        NEXT_NOISE[:] = [noise]
        extra = dict(image=Image.open(init_path))
        sdfix_args = ["--prompt", PROMPT, "--init-image", f"fixtures:refs/{init_path.name}", "--vae-encode", "mean"]
        if kind != "img2img":
            extra["mask_image"] = Image.open(mask_path)
            extra.update(height=h, width=w)
            sdfix_args += ["--mask", f"fixtures:refs/{mask_path.name}", "--no-paste-back"]
        final = pipe(prompt=PROMPT, **call, **extra, output_type="latent").images
        assert not NEXT_NOISE, f"{name}: the pipeline did not draw its noise"
        tensors[f"{name}.initial"] = noise
        tensors[f"{name}.final"] = final
        tensors[f"{name}.image"] = to_uint8(pipe.vae, final)
        # The img2img and inpainting pipelines have no guidance_rescale (their **kwargs swallow it).
        no_rescale = [] if "--baseline" in args else ["--guidance-rescale", "0"]
        cases[name] = sdfix_args + args + no_rescale + (["--model", "fixtures:tiny-sd-inpaint"] if kind == "inpaint9" else [])

    # Text to image at 10x14 px: latents 5x7, not multiples of the UNet's 4. diffusers' pipeline
    # insists on multiples of 8 px (tiny-sd's VAE factor is 2); its UNet does not.
    pipe = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.check_inputs = lambda *a, **k: None
    initial = torch.randn((1, 4, 7, 5), generator=generator)
    final = pipe(
        prompt=PROMPT, num_inference_steps=10, guidance_scale=7.5, guidance_rescale=0.7, latents=initial.clone(),
        height=14, width=10, output_type="latent",
    ).images
    tensors["size_10x14.initial"] = initial
    tensors["size_10x14.final"] = final
    tensors["size_10x14.image"] = to_uint8(pipe.vae, final)
    cases["size_10x14"] = ["--prompt", PROMPT, "--steps", "10", "--width", "10", "--height", "14"]

    # The VAE encoder alone: a batch of two 24x16 pictures.
    images = torch.stack(
        [torch.from_numpy(np.asarray(pattern(24, 16, seed=s))).permute(2, 0, 1) for s in (1, 2)]
    ).float() / 127.5 - 1
    dist = pipe.vae.encode(images).latent_dist
    tensors["vae_encode.images"] = images
    tensors["vae_encode.mean"] = dist.mean
    tensors["vae_encode.std"] = dist.std


@torch.no_grad()
def full_size(folder: pathlib.Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(
        pipe.scheduler.config, prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"
    )
    generator = torch.Generator().manual_seed(SEED)
    initial = torch.randn((1, 4, 12, 16), generator=generator)
    final = pipe(
        prompt=PROMPT, num_inference_steps=5, guidance_scale=7.5, guidance_rescale=0.7, latents=initial.clone(),
        height=96, width=128, output_type="latent",
    ).images
    image = torch.from_numpy(np.asarray(pattern(128, 96, seed=7))).permute(2, 0, 1)[None].float() / 127.5 - 1
    dist = pipe.vae.encode(image).latent_dist
    safetensors.torch.save_file(
        {"initial": initial, "final": final, "vae_encode.images": image.contiguous(),
         "vae_encode.mean": dist.mean.contiguous(), "vae_encode.std": dist.std.contiguous()},
        folder / "refs.safetensors",
        metadata=dict(generator="scripts/make_img2img_refs.py --full-size", diffusers=diffusers.__version__),
    )
    print(f"wrote {folder / 'refs.safetensors'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", type=pathlib.Path)
    args = parser.parse_args()
    if args.full_size:
        full_size(args.full_size)
        return
    make_inpaint_model()
    tensors, cases = {}, {}
    tiny_cases(tensors, cases)
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        REFS / "img2img.safetensors",
        metadata=dict(generator="scripts/make_img2img_refs.py", diffusers=diffusers.__version__, torch=torch.__version__),
    )
    (REFS / "img2img.json").write_text(json.dumps(cases, indent=1) + "\n")
    print(f"wrote {len(cases)} cases")


if __name__ == "__main__":
    main()
