#!/usr/bin/env python3
"""One fine-tuning step on the tiny fixture model in PyTorch + diffusers, for tests/finetune.rs
(`one_training_step_matches_diffusers`). Run by hand, never in CI:

    /work/main/.venv-oracle/bin/python scripts/make_finetune_refs.py

The step is diffusers' `train_text_to_image.py` with the paper's settings: DDPMScheduler from
tests/fixtures/tiny-sd's config with `rescale_betas_zero_snr=True, prediction_type="v_prediction"`
(Algorithm 1; `add_noise` for x_t, `get_velocity` for the target), the UNet and the text encoder
both trained, `F.mse_loss` in f32, `clip_grad_norm_(params, 1.0)`, then one
`torch.optim.AdamW(lr=1e-4, weight_decay=1e-2)` step (the first step moves every weight by about lr, so an element whose gradient is near 0 amplifies its rounding by lr / |g|: 1e-4 keeps that under the 1e-6 tolerance). Inputs (latents, noise, timesteps including
t = T - 1, captions, one of them empty) are stored with the results.

Writes tests/fixtures/refs/finetune.safetensors: `latents`, `noise`, `timesteps` (i64), `loss`,
`grad_norm`, and per trainable parameter `grad.<component>/<name>` and `after.<component>/<name>`
(names as in the weights files). The text encoder's 49408-row token embedding is stored for the
rows the captions use only (`token_rows`, i64); the other rows have no gradient, so AdamW only
decays them. tests/fixtures/refs/finetune.json holds the captions, hyper-parameters and versions.
"""

import json
import pathlib

import diffusers
import safetensors.torch
import torch
import torch.nn.functional as F
import transformers
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests" / "fixtures" / "tiny-sd"
OUT = ROOT / "tests" / "fixtures" / "refs"
CAPTIONS = ["a red circle on a white background", ""]
TIMESTEPS = [999, 123]
LR = 1e-4
WEIGHT_DECAY = 1e-2
MAX_GRAD_NORM = 1.0
TOKEN_EMBEDDING = "embeddings.token_embedding.weight"


def main() -> None:
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(MODEL / "unet").float().train()
    clip = CLIPTextModel.from_pretrained(MODEL / "text_encoder").float().train()
    tokenizer = CLIPTokenizer.from_pretrained(MODEL / "tokenizer")
    config = DDPMScheduler.load_config(MODEL / "scheduler")
    scheduler = DDPMScheduler.from_config(config, rescale_betas_zero_snr=True, prediction_type="v_prediction")

    size = unet.config.sample_size
    latents = torch.randn(len(CAPTIONS), unet.config.in_channels, size, size)
    noise = torch.randn_like(latents)
    timesteps = torch.tensor(TIMESTEPS, dtype=torch.long)
    ids = tokenizer(CAPTIONS, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids

    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = scheduler.get_velocity(latents, noise, timesteps)
    context = clip(ids).last_hidden_state
    prediction = unet(noisy, timesteps, encoder_hidden_states=context).sample
    loss = F.mse_loss(prediction.float(), target.float(), reduction="mean")
    loss.backward()

    named = [(f"unet/{n}", p) for n, p in unet.named_parameters()]
    named += [(f"text_encoder/{n.removeprefix('text_model.')}", p) for n, p in clip.named_parameters()]
    rows = torch.unique(ids)
    out = {
        "latents": latents,
        "noise": noise,
        "timesteps": timesteps,
        "loss": loss.detach().reshape(1),
        "token_rows": rows,
    }

    def stored(name: str, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach().clone()
        return tensor[rows] if name.endswith(TOKEN_EMBEDDING) else tensor

    for name, p in named:
        out[f"grad.{name}"] = stored(name, p.grad)
    params = [p for _, p in named]
    out["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM).reshape(1)
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    optimizer.step()
    for name, p in named:
        out[f"after.{name}"] = stored(name, p)

    OUT.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in out.items()}, OUT / "finetune.safetensors")
    meta = {
        "captions": CAPTIONS,
        "timesteps": TIMESTEPS,
        "lr": LR,
        "weight_decay": WEIGHT_DECAY,
        "max_grad_norm": MAX_GRAD_NORM,
        "loss": loss.item(),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
    }
    (OUT / "finetune.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"loss {loss.item():.6f}, grad norm {out['grad_norm'].item():.4f}, {len(named)} parameters")


if __name__ == "__main__":
    main()
