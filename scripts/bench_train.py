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


def torch_step_ms(model: pathlib.Path, batch: int, steps: int, threads: int) -> float:
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").float().train()
    clip = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").float().train()
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - rescale_zero_terminal_snr(betas), 0).float()
    params = list(unet.parameters()) + list(clip.parameters())
    optimiser = torch.optim.AdamW(params, lr=3e-4, weight_decay=1e-2)
    size = unet.config.sample_size
    times = []
    for step in range(steps + 3):
        started = time.perf_counter()
        x0 = torch.randn(batch, unet.config.in_channels, size, size)
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,))
        captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(step, step + batch)]
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=clip(ids).last_hidden_state).sample, target)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        if step >= 3:
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def sdfix_step_ms(sdfix: pathlib.Path, model: str, work: pathlib.Path, threads: int) -> float:
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))

    def run(steps: int) -> float:
        out = work / f"run-{steps}"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir()
        for cached in work.glob("cache/latents.*"):
            shutil.copy(cached, out / cached.name)
        started = time.perf_counter()
        subprocess.run([str(sdfix), "finetune", "--model", model, "--data", "demo", "--out", str(out),
                        "--steps", str(steps), "--train-text-encoder", "--quiet"], check=True, env=env)
        return time.perf_counter() - started

    if not (work / "cache/latents.safetensors").exists():
        (work / "cache").mkdir(parents=True, exist_ok=True)
        run(1)
        for cached in (work / "run-1").glob("latents.*"):
            shutil.copy(cached, work / "cache" / cached.name)
    short, long = run(10), run(40)
    return (long - short) / 30 * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo-flawed")
    parser.add_argument("--sdfix", default=str(ROOT / "target/release/sdfix"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model_dir = ROOT / "models" / args.model if (ROOT / "models" / args.model).is_dir() else pathlib.Path(args.model)
    rounds = []
    with tempfile.TemporaryDirectory() as work:
        for round_index in range(args.rounds):
            torch_ms = torch_step_ms(model_dir, 16, 20, args.threads)
            sdfix_ms = sdfix_step_ms(pathlib.Path(args.sdfix), args.model, pathlib.Path(work), args.threads)
            rounds.append({"round": round_index, "torch_ms": round(torch_ms, 1), "sdfix_ms": round(sdfix_ms, 1),
                           "ratio": round(sdfix_ms / torch_ms, 3)})
            print(json.dumps(rounds[-1]), flush=True)
    print(json.dumps({"median_ratio": statistics.median(r["ratio"] for r in rounds)}))


if __name__ == "__main__":
    main()
