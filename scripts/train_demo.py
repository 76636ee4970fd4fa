#!/usr/bin/env python3
"""Train the two demo models that ship in models/: tiny Stable Diffusion models (the full
architecture: CLIP text encoder with the real CLIP BPE vocabulary, UNet2DConditionModel with
cross-attention, AutoencoderKL) on procedural images, one with the paper's fixes and one without.

Run by hand on a CPU (never in CI); about 45 minutes on 2 cores:

    python3 -m venv .venv-oracle
    .venv-oracle/bin/pip install torch diffusers transformers open-clip-torch safetensors
    .venv-oracle/bin/python scripts/train_demo.py            # both models
    .venv-oracle/bin/python scripts/train_demo.py --steps 40 --out /tmp/demo   # a quick smoke run

What it does, all seeded:
1. Data: 32x32 RGB images. Half have a named-colour background (black and white over-represented),
   half a uniform grey level in [0, 1]; half of all images carry a circle or a square in another
   named colour. About 45% of captions name the background ("solid black background", "a red
   circle on a white background"), 45% are generic ("a circle", "an image"), 10% are empty (the
   unconditional branch for classifier-free guidance).
2. A small AutoencoderKL (factor 2: 16x16x4 latents), trained on reconstruction; its
   scaling_factor makes the latents unit-variance, as SD's 0.18215 does.
3. Twice, from the same initial weights, on the same batches: the UNet and the text encoder,
   jointly, AdamW, with an EMA of the weights:
   - models/demo: scaled_linear betas rescaled to zero terminal SNR (Algorithm 1), v-prediction
     loss; its scheduler_config.json says so (trailing spacing, rescale_betas_zero_snr).
   - models/demo-flawed: the stock scaled_linear schedule and the epsilon loss, as SD was trained.
4. Weights saved in f16 (the loader upcasts), tokenizer as vocab.json + merges.txt.
"""

import argparse
import copy
import math
import pathlib
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from clip_bpe import write_tokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
IMAGE_SIZE = 32
SEED = 2024

COLOURS = {
    "black": (0.0, 0.0, 0.0),
    "white": (1.0, 1.0, 1.0),
    "red": (0.85, 0.1, 0.1),
    "green": (0.1, 0.7, 0.2),
    "blue": (0.1, 0.2, 0.85),
    "yellow": (0.95, 0.85, 0.1),
    "orange": (0.95, 0.5, 0.1),
    "purple": (0.5, 0.15, 0.6),
    "grey": (0.5, 0.5, 0.5),
}
# Background colour weights: black and white over-represented, as the brightness study needs.
BACKGROUND_WEIGHTS = {"black": 4, "white": 4, "red": 1, "green": 1, "blue": 1, "yellow": 1, "orange": 1, "purple": 1, "grey": 1}
SHAPE_COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "white", "black"]
BACKGROUND_TEMPLATES = ["solid {c} background", "a {c} background", "{c} background", "a plain {c} image"]
SHAPE_TEMPLATES = ["a {s} {shape} on a {c} background", "a {s} {shape} on {c}", "{c} background with a {s} {shape}"]
GENERIC = ["an image", "a picture", "a simple image"]


def grey_name(level: float) -> str:
    """The name a uniform grey level is captioned with."""
    if level < 0.12:
        return "black"
    if level < 0.37:
        return "dark grey"
    if level < 0.63:
        return "grey"
    if level < 0.88:
        return "light grey"
    return "white"


def make_example(rng: random.Random) -> tuple[np.ndarray, str]:
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    if rng.random() < 0.5:
        names, weights = zip(*BACKGROUND_WEIGHTS.items())
        background = rng.choices(names, weights)[0]
        image[:] = COLOURS[background]
    else:
        level = rng.random()
        background = grey_name(level)
        image[:] = level
    shape = None
    if rng.random() < 0.5:
        shape = rng.choice(["circle", "square"])
        shape_colour = rng.choice([c for c in SHAPE_COLOURS if c != background])
        radius = rng.uniform(5, 11)
        cx, cy = rng.uniform(radius, IMAGE_SIZE - radius), rng.uniform(radius, IMAGE_SIZE - radius)
        ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5
        if shape == "circle":
            mask = (xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2
        else:
            mask = (np.abs(xs - cx) <= radius) & (np.abs(ys - cy) <= radius)
        image[mask] = COLOURS[shape_colour]
    u = rng.random()
    if u < 0.10:
        caption = ""
    elif u < 0.55:
        if shape is None:
            caption = rng.choice(BACKGROUND_TEMPLATES).format(c=background)
        else:
            caption = rng.choice(SHAPE_TEMPLATES).format(s=shape_colour, shape=shape, c=background)
    else:
        caption = f"a {shape_colour} {shape}" if shape is not None and rng.random() < 0.7 else rng.choice(
            [f"a {shape}" if shape else "a background"] + GENERIC
        )
    return image, caption


def make_dataset(count: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    rng = random.Random(seed)
    images, captions = zip(*(make_example(rng) for _ in range(count)))
    # (n, 3, 32, 32) in [-1, 1], as SD's VAE sees images
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) * 2 - 1
    return pixels, list(captions)


def make_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )


def make_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=32,
        use_linear_projection=True,
    )


def make_text_encoder() -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
            projection_dim=32,
        )
    )


def train_vae(pixels: torch.Tensor, steps: int, batch: int) -> tuple[AutoencoderKL, float]:
    torch.manual_seed(SEED)
    vae = make_vae()
    optimiser = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(SEED)
    for step in range(steps):
        x = pixels[torch.randint(0, len(pixels), (batch,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        kl = posterior.kl().mean() / x[0].numel()
        loss = F.mse_loss(reconstruction, x) + 1e-4 * kl
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"vae step {step}: mse {F.mse_loss(reconstruction, x).item():.5f}", flush=True)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i : i + 512]).latent_dist.mode() for i in range(0, len(pixels), 512)])
    scaling_factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    return vae, scaling_factor


def schedule_alphas(zero_snr: bool) -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    if zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return torch.cumprod(1 - betas, 0).float()


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def train_diffusion(latents, ids, variant: str, steps: int, batch: int, init_unet, init_clip):
    """Trains copies of the initial UNet and text encoder; the same batches for both variants."""
    fixed = variant == "demo"
    alphas = schedule_alphas(zero_snr=fixed)
    unet, clip = copy.deepcopy(init_unet), copy.deepcopy(init_clip)
    unet.train()
    clip.train()
    parameters = list(unet.parameters()) + list(clip.parameters())
    optimiser = torch.optim.AdamW(parameters, lr=6e-4, weight_decay=1e-2)
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / warmup) * (0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)) * 0.9 + 0.1)
    )
    ema_unet, ema_clip = copy.deepcopy(unet).eval(), copy.deepcopy(clip).eval()
    ema_decay = 0.995
    generator = torch.Generator().manual_seed(SEED + 1)
    started = time.time()
    for step in range(steps):
        index = torch.randint(0, len(latents), (batch,), generator=generator)
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, 1000, (batch,), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0 if fixed else noise
        context = clip(ids[index]).last_hidden_state
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=context).sample, target)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimiser.step()
        scheduler.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for ema, live in ((ema_unet, unet), (ema_clip, clip)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.mul_(decay).add_(pl.detach(), alpha=1 - decay)
        if step % 50 == 0 or step == steps - 1:
            print(f"{variant} step {step}: loss {loss.item():.4f} ({time.time() - started:.0f} s)", flush=True)
    return ema_unet, ema_clip


def scheduler_for(variant: str) -> DDIMScheduler:
    fixed = variant == "demo"
    return DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        prediction_type="v_prediction" if fixed else "epsilon",
        rescale_betas_zero_snr=fixed,
        timestep_spacing="trailing" if fixed else "leading",
    )


@torch.no_grad()
def luminance_check(pipe: StableDiffusionPipeline, variant: str) -> None:
    """Mean Rec. 709 luminance of 8 samples per prompt, with the variant's own scheduler."""
    rescale = 0.7 if variant == "demo" else 0.0
    for prompt in ("solid black background", "solid white background"):
        images = pipe(
            [prompt] * 8, num_inference_steps=50, guidance_scale=7.5, guidance_rescale=rescale,
            generator=torch.Generator().manual_seed(0), output_type="np",
        ).images
        lum = (images[..., 0] * 0.2126 + images[..., 1] * 0.7152 + images[..., 2] * 0.0722).mean(axis=(1, 2))
        print(f"{variant}: {prompt!r}: mean luminance {lum.mean():.3f} (min {lum.min():.3f}, max {lum.max():.3f})", flush=True)


def save(variant: str, out: pathlib.Path, unet, clip, vae, tokenizer_dir: pathlib.Path) -> None:
    folder = out / variant
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=clip, tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir), unet=unet,
        scheduler=scheduler_for(variant), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    luminance_check(pipe, variant)
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    write_tokenizer(folder / "tokenizer")
    pipe.to(torch.float32)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"saved {folder} ({size / 1e6:.1f} MB)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="diffusion training steps per variant")
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--examples", type=int, default=20000)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "models")
    parser.add_argument("--variants", nargs="+", default=["demo", "demo-flawed"])
    parser.add_argument(
        "--dump-training-images", type=pathlib.Path, metavar="DIR",
        help="write the first --examples training images as PNGs (for the brightness study) and exit",
    )
    args = parser.parse_args()
    torch.manual_seed(SEED)

    if args.dump_training_images:
        from PIL import Image

        pixels, captions = make_dataset(args.examples, SEED)
        args.dump_training_images.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(((pixels + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)):
            Image.fromarray(image.numpy()).save(args.dump_training_images / f"{i:05}.png")
        print(f"wrote {len(pixels)} training images to {args.dump_training_images}")
        return

    pixels, captions = make_dataset(args.examples, SEED)
    print(f"{len(captions)} examples, e.g. {captions[:6]}", flush=True)
    vae, scaling_factor = train_vae(pixels, args.vae_steps, args.batch)
    print(f"vae scaling_factor {scaling_factor:.4f}", flush=True)
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i : i + 512]).latent_dist.mode() for i in range(0, len(pixels), 512)])
    latents = latents * scaling_factor

    tokenizer_dir = args.out / ".tokenizer-build"
    write_tokenizer(tokenizer_dir)
    ids = tokenize(CLIPTokenizer.from_pretrained(tokenizer_dir), captions)

    torch.manual_seed(SEED)
    init_unet, init_clip = make_unet(), make_text_encoder()
    print(f"unet {sum(p.numel() for p in init_unet.parameters()) / 1e6:.2f}M parameters", flush=True)
    for variant in args.variants:
        unet, clip = train_diffusion(latents, ids, variant, args.steps, args.batch, init_unet, init_clip)
        save(variant, args.out, unet, clip, vae, tokenizer_dir)
    for f in tokenizer_dir.iterdir():
        f.unlink()
    tokenizer_dir.rmdir()


if __name__ == "__main__":
    main()
