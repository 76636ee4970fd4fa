#!/usr/bin/env python3
"""References for the live previews (tests/previews.rs). Run by hand, never in CI:

    .venv-oracle/bin/python scripts/make_taesd_refs.py

Writes
- tests/fixtures/tiny-taesd/: a diffusers `AutoencoderTiny` with random weights and 8 channels
  instead of 64 (TAESD's layout otherwise: 3, 3, 3, 1 decoder blocks, three x2 upsamplings),
  saved with `save_pretrained` (config.json + diffusion_pytorch_model.safetensors, encoder too);
- tests/fixtures/refs/previews.safetensors:
  - `taesd_latents` (2, 4, 5, 7) random latents times 3 (so TAESD's tanh clamp matters) and
    `taesd_decoded`, `AutoencoderTiny.decode(latents).sample` in f32: what sdfix's TAESD decoder
    must give within 1e-4;
  - `approx_latents` (2, 4, 6, 5) and, per family (`sd`, `sdxl`), `approx_{family}`: A1111's
    `cheap_approximation`, `torch.einsum("...lxy,lr -> ...rxy", latents, coeffs)` with A1111's
    coefficient tables (copied below from modules/sd_vae_approx.py), and `approx_{family}_u8`:
    A1111's `single_sample_to_image` of each image, `(clamp(x * 0.5 + 0.5, 0, 1) * 255)` cast to
    uint8 (truncation), (b, h, w, 3).

With `--full-size DIR` it writes instead a random `AutoencoderTiny` with diffusers' default config
(TAESD's real sizes: 64 channels, 1.2 M decoder parameters) to DIR and prints diffusers' decode time
of one 64x64 latent (a 512x512 preview), for the ignored timing test:

    .venv-oracle/bin/python scripts/make_taesd_refs.py --full-size /tmp/taesd-full
    SDFIX_TAESD=/tmp/taesd-full cargo test --release --test previews -- --ignored --nocapture
"""

import argparse
import pathlib
import time

import diffusers
import numpy as np
import safetensors.torch
import torch
from diffusers import AutoencoderTiny

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
TAESD = FIXTURES / "tiny-taesd"
REFS = FIXTURES / "refs"
SEED = 31

# A1111 modules/sd_vae_approx.py cheap_approximation: rows are latent channels, columns R, G, B.
A1111_SD = [
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
]
A1111_SDXL = [
    [0.3448, 0.4168, 0.4395],
    [-0.1953, -0.0290, 0.0250],
    [0.1074, 0.0886, -0.0163],
    [-0.3730, -0.2499, -0.2088],
]


def single_sample_to_image(x):
    """A1111 sd_samplers_common.single_sample_to_image after samples_to_images_tensor: (3, h, w)
    in [-1, 1] -> (h, w, 3) uint8."""
    x = x * 0.5 + 0.5
    x = torch.clamp(x, min=0.0, max=1.0)
    x = 255.0 * np.moveaxis(x.cpu().numpy(), 0, 2)
    return x.astype(np.uint8)


def full_size(folder):
    torch.manual_seed(SEED)
    model = AutoencoderTiny().eval()
    model.save_pretrained(folder, safe_serialization=True)
    latents = torch.randn(1, 4, 64, 64)
    times = []
    with torch.no_grad():
        for _ in range(6):
            start = time.perf_counter()
            model.decode(latents)
            times.append(time.perf_counter() - start)
    times = sorted(times[1:])
    print(
        f"diffusers AutoencoderTiny.decode 1x4x64x64 -> 512x512 on {torch.get_num_threads()} threads: "
        f"median {times[len(times) // 2] * 1000:.1f} ms, min {times[0] * 1000:.1f} ms (5 runs after a warm-up)"
    )
    print("wrote", folder)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--full-size", type=pathlib.Path, help="write a full-size random TAESD here instead")
    args = parser.parse_args()
    if args.full_size:
        full_size(args.full_size)
        return
    torch.manual_seed(SEED)
    model = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
    ).eval()
    # Random init leaves many ReLUs dead at 8 channels; wider weights keep the output varied.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("decoder.") and name.endswith("weight"):
                p.mul_(1.5)
    TAESD.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(TAESD, safe_serialization=True)

    tensors = {}
    latents = torch.randn(2, 4, 5, 7) * 3.0
    with torch.no_grad():
        decoded = model.decode(latents).sample
    tensors["taesd_latents"] = latents.contiguous()
    tensors["taesd_decoded"] = decoded.contiguous()
    print("taesd decoded", tuple(decoded.shape), "range", decoded.min().item(), decoded.max().item())

    approx = torch.randn(2, 4, 6, 5) * 2.0
    tensors["approx_latents"] = approx.contiguous()
    for family, coeffs in [("sd", A1111_SD), ("sdxl", A1111_SDXL)]:
        rgb = torch.einsum("...lxy,lr -> ...rxy", approx, torch.tensor(coeffs))
        tensors[f"approx_{family}"] = rgb.contiguous()
        u8 = np.stack([single_sample_to_image(image) for image in rgb])
        tensors[f"approx_{family}_u8"] = torch.from_numpy(u8).contiguous()

    REFS.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(
        tensors,
        REFS / "previews.safetensors",
        metadata=dict(
            generator="scripts/make_taesd_refs.py",
            diffusers=diffusers.__version__,
            torch=torch.__version__,
            numpy=np.__version__,
        ),
    )
    print("wrote", TAESD, "and", REFS / "previews.safetensors")


if __name__ == "__main__":
    main()
