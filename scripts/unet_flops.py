#!/usr/bin/env python3
"""FLOPs of one UNet pass per image (PyTorch's FlopCounterMode on meta tensors: no weights, no
time) for SDXL base and SD 2.1-base at 512 and 1024 px, from models/arch's configs; a step with CFG
is two passes.

    .venv-oracle/bin/python scripts/unet_flops.py
"""
import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode
for arch, ctx, added in [("sdxl", 2048, True), ("sd2.1-base", 1024, False)]:
    with torch.device("meta"):
        u = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(f"models/arch/{arch}/unet"))
        for px in (512, 1024):
            x = torch.randn(1, 4, px // 8, px // 8)
            c = torch.randn(1, 77, ctx)
            kw = dict(added_cond_kwargs=dict(text_embeds=torch.randn(1, 1280), time_ids=torch.randn(1, 6))) if added else {}
            with FlopCounterMode(display=False) as f:
                u(x, 999, encoder_hidden_states=c, **kw)
            print(arch, px, f"{f.get_total_flops()/1e12:.2f} TFLOP per image per UNet pass")
