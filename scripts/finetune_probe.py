#!/usr/bin/env python3
"""How much a model's text reaches its output (docs/brightness-study.md, "Fine-tuning demo-flawed"),
with diffusers and transformers as the reference implementation:

1. The text encoder: the RMS difference of the last hidden state between "solid black background"
   and "solid white background", per token position (positions 0-1 are <start> and "solid").
2. The UNet: on 8 latents of pure noise, the RMS difference between its outputs for those two
   prompts (and the empty one) at t = 999, 900, 600, 200.

Run by hand with the oracle environment:

    .venv-oracle/bin/python scripts/finetune_probe.py models/demo models/demo-flawed [MODEL...]
"""

import sys

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

BLACK, WHITE = "solid black background", "solid white background"


def main() -> None:
    for path in sys.argv[1:]:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").float().eval()
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").float().eval()
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")

        def context(prompt: str) -> torch.Tensor:
            ids = tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            return text_encoder(ids).last_hidden_state

        with torch.no_grad():
            black, white, empty = context(BLACK), context(WHITE), context("")
            per_token = (black - white)[0].pow(2).mean(-1).sqrt()[:6]
            print(f"{path}: text encoder, rms(black - white) at token positions 0-5: "
                  + " ".join(f"{v:.3f}" for v in per_token.tolist()))
            noise = torch.randn(8, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size,
                                generator=torch.Generator().manual_seed(1))
            for t in [999, 900, 600, 200]:
                out = {name: unet(noise, t, encoder_hidden_states=ctx.expand(8, -1, -1)).sample
                       for name, ctx in (("black", black), ("white", white), ("empty", empty))}
                rms = lambda a, b: (out[a] - out[b]).pow(2).mean().sqrt().item()
                print(f"{path}: UNet at t={t}: rms(black - white) {rms('black', 'white'):.3f}, "
                      f"rms(black - empty) {rms('black', 'empty'):.3f}, std(empty) {out['empty'].std().item():.3f}")


if __name__ == "__main__":
    main()
