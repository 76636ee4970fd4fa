#!/usr/bin/env python3
"""One fine-tuning step of a demo model, sdfix against PyTorch + diffusers, in alternating rounds
(docs/performance.md, "Fine-tuning step").

The step is the same work in both: the v-prediction loss on a batch of 16 latents (4x16x16) with
its captions through the text encoder, the backward through the UNet and the text encoder, gradient
clipping at 1.0, one AdamW step (lr 3e-4, weight decay 0.01). PyTorch times its steps directly
(after 3 warm-up steps). sdfix runs `sdfix finetune --model M --data demo` for 10 and for 40 steps
on cached latents and takes the difference of the two wall times over 30 steps, which cancels
loading, the latent cache and saving.

    .venv-oracle/bin/python scripts/bench_train.py [--model demo-flawed] [--rounds 3] [--threads 2]

With --arch (a folder of diffusers configs, e.g. models/arch/sd2.1-base) it measures the GPU
issue's case instead: random weights of that architecture saved once as a model folder both tools
load, 16 solid-colour images at --size with captions, batch --batch, the text encoder frozen as in
diffusers' train_text_to_image.py (f32, no EMA), on --device; also the peak device memory (PyTorch:
max_memory_allocated; sdfix: nvidia-smi sampled every 50 ms, above the level before the run):

    python3 scripts/bench_train.py --arch models/arch/sd2.1-base --size 512 --batch 4 --device cuda \
        --sdfix target-cuda/release/sdfix --rounds 2
"""

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
CAPTIONS = ["solid black background", "solid white background", "a red circle on a blue background", "", "an image",
            "a green square", "a plain grey image", "white background with a black circle"]


def torch_step_ms(model: pathlib.Path, batch: int, steps: int, threads: int, device: str = "cpu",
                  train_text_encoder: bool = True, size: int = 0) -> tuple[float, float]:
    """Median ms per step and the peak device memory in MiB (0 on the CPU)."""
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").float().to(dev).train()
    clip = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").float().to(dev).train(train_text_encoder)
    clip.requires_grad_(train_text_encoder)
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - rescale_zero_terminal_snr(betas), 0).float().to(dev)
    params = list(unet.parameters()) + (list(clip.parameters()) if train_text_encoder else [])
    optimiser = torch.optim.AdamW(params, lr=3e-4, weight_decay=1e-2)
    vae_blocks = len(json.loads((pathlib.Path(model) / "vae" / "config.json").read_text())["block_out_channels"])
    latent = size // 2 ** (vae_blocks - 1) if size else unet.config.sample_size
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 3):
        sync()
        started = time.perf_counter()
        x0 = torch.randn(batch, unet.config.in_channels, latent, latent, device=dev)
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,), device=dev)
        captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(step, step + batch)]
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.to(dev)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0
        with torch.set_grad_enabled(train_text_encoder):
            context = clip(ids).last_hidden_state
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=context).sample, target)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        sync()
        if step >= 3:
            times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else 0.0
    return statistics.median(times) * 1000, peak


def smi_used_mib() -> float:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return float(out.split()[0])


def sdfix_step_ms(sdfix: pathlib.Path, model: str, work: pathlib.Path, threads: int, extra: list[str],
                  steps: tuple[int, int] = (10, 40), device: str = "cpu") -> tuple[float, float]:
    """ms per step from two runs' difference, and the longer run's peak device memory (MiB above
    the level before it; 0 on the CPU)."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))

    def run(count: int) -> tuple[float, float]:
        out = work / f"run-{count}"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir()
        for cached in work.glob("cache/latents.*"):
            shutil.copy(cached, out / cached.name)
        base = smi_used_mib() if device == "cuda" else 0.0
        started = time.perf_counter()
        process = subprocess.Popen([str(sdfix), "finetune", "--model", model, "--out", str(out), "--steps", str(count),
                                    "--device", device, "--quiet", *extra], env=env)
        peak = base
        while process.poll() is None:
            if device == "cuda":
                peak = max(peak, smi_used_mib())
            time.sleep(0.05)
        if process.returncode != 0:
            raise SystemExit(f"sdfix finetune failed ({process.returncode})")
        return time.perf_counter() - started, peak - base

    if not (work / "cache/latents.safetensors").exists():
        (work / "cache").mkdir(parents=True, exist_ok=True)
        run(1)
        for cached in (work / "run-1").glob("latents.*"):
            shutil.copy(cached, work / "cache" / cached.name)
    (short, _), (long, peak) = run(steps[0]), run(steps[1])
    return (long - short) / (steps[1] - steps[0]) * 1000, peak


def random_model(arch: pathlib.Path, out: pathlib.Path) -> None:
    """Random weights of `arch`'s configs (seed 0), saved in f32 as a diffusers folder, with the
    real CLIP tokenizer files of the demo model."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(arch / "unet")).save_pretrained(out / "unet")
    AutoencoderKL.from_config(AutoencoderKL.load_config(arch / "vae")).save_pretrained(out / "vae")
    CLIPTextModel(CLIPTextConfig.from_json_file(arch / "text_encoder" / "config.json")).save_pretrained(out / "text_encoder")
    shutil.copytree(arch / "scheduler", out / "scheduler")
    shutil.copytree(ROOT / "models" / "demo" / "tokenizer", out / "tokenizer")
    shutil.copy(ROOT / "models" / "demo" / "model_index.json", out / "model_index.json")


def solid_images(out: pathlib.Path, size: int, count: int) -> None:
    from PIL import Image

    out.mkdir(parents=True)
    colours = {"black": (0, 0, 0), "white": (255, 255, 255), "red": (220, 20, 20), "blue": (20, 40, 220)}
    for i in range(count):
        name, rgb = list(colours.items())[i % len(colours)]
        Image.new("RGB", (size, size), rgb).save(out / f"{i:03}.png")
        (out / f"{i:03}.txt").write_text(f"solid {name} background")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo-flawed")
    parser.add_argument("--arch", type=pathlib.Path, help="a folder of diffusers configs: random weights, --size images")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sdfix", default=str(ROOT / "target/release/sdfix"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rounds = []
    with tempfile.TemporaryDirectory() as work:
        work = pathlib.Path(work)
        if args.arch:
            model_dir = work / "model"
            random_model(args.arch, model_dir)
            solid_images(work / "data", args.size, 16)
            model, batch, torch_kwargs = str(model_dir), args.batch, dict(train_text_encoder=False, size=args.size)
            extra = ["--data", str(work / "data"), "--size", str(args.size), "--batch-size", str(batch)]
            steps = (3, 13)
        else:
            local = ROOT / "models" / args.model
            model_dir = local if local.is_dir() else pathlib.Path(args.model)
            model, batch, torch_kwargs = args.model, 16, {}
            extra = ["--data", "demo", "--train-text-encoder"]
            steps = (10, 40)
        for round_index in range(args.rounds):
            torch_ms, torch_peak = torch_step_ms(model_dir, batch, 20 if not args.arch else 10, args.threads,
                                                 args.device, **torch_kwargs)
            sdfix_ms, sdfix_peak = sdfix_step_ms(pathlib.Path(args.sdfix), model, work / "sdfix", args.threads, extra,
                                                 steps, args.device)
            row = {"round": round_index, "torch_ms": round(torch_ms, 1), "sdfix_ms": round(sdfix_ms, 1),
                   "ratio": round(sdfix_ms / torch_ms, 3)}
            if args.device == "cuda":
                row.update(torch_peak_mib=round(torch_peak), sdfix_peak_mib=round(sdfix_peak))
            rounds.append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps({"median_ratio": statistics.median(r["ratio"] for r in rounds)}))


if __name__ == "__main__":
    main()
