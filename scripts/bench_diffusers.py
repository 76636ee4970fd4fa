#!/usr/bin/env python3
"""The diffusers side of the benchmark: same architecture (models/arch configs, random weights),
resolution, steps, dtype, thread count and timing protocol as `sdfix bench`, same JSON fields.

    .venv-oracle/bin/python scripts/bench_diffusers.py --arch sd2.1-base --width 256 --height 256 --steps 3

Protocol: one untimed warm-up per stage; text encoding and VAE decode --repeat times; the UNet with
CFG (batch 2 x --batch-size) --steps times; the guidance + DDIM arithmetic --steps times; median and
min in ms; total_s from the medians; peak RSS (ru_maxrss) in MB, or peak device memory on CUDA.
Attention is PyTorch's SDPA (diffusers' default AttnProcessor2_0). For SDXL (a folder with
text_encoder_2) the text side is both encoders (`hidden_states[-2]` concatenated, the second's
projected pooled output, as `StableDiffusionXLPipeline.encode_prompt`), and the UNet gets the pooled
embeddings and the default micro-conditioning as `added_cond_kwargs`.

--profile adds `op_ms`, as `sdfix bench --profile`: one more run of each stage under the PyTorch
profiler, its aten ops' self times summed into the same kinds (conv 3x3, conv 1x1, linear =
addmm + mm, attention = SDPA, group norm, gelu, upsample; "other" is the rest of that run).
"""

import argparse
import json
import os
import pathlib
import resource
import time

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROMPT = "a photo of an astronaut riding a horse on mars"


def timed(fn, times, sync):
    fn()
    sync()
    out = []
    for _ in range(times):
        start = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - start) * 1000)
    return out


OP_KINDS = {
    "aten::addmm": "linear",
    "aten::mm": "linear",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::native_group_norm": "group norm",
    "aten::gelu": "gelu",
    "aten::upsample_nearest2d": "upsample",
}


def op_ms(fn):
    """One run of `fn` under the profiler: ms per kind of op, "other" the rest of its wall time;
    and the linear layers' (aten addmm and mm) ms and calls by shape, "rows x in x out"."""
    started = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    wall_ms = (time.perf_counter() - started) * 1000
    kinds, shapes = {}, {}
    for event in prof.key_averages(group_by_input_shape=True):
        operands = {"aten::addmm": event.input_shapes[1:3], "aten::mm": event.input_shapes[0:2]}.get(event.key)
        if operands and len(operands) == 2 and len(operands[0]) == 2 and len(operands[1]) == 2:
            key = f"{operands[0][0]}x{operands[0][1]}x{operands[1][1]}"
            entry = shapes.setdefault(key, {"ms": 0.0, "calls": 0})
            entry["ms"] += event.self_cpu_time_total / 1000
            entry["calls"] += event.count
        if event.key == "aten::mkldnn_convolution":
            kernel = event.input_shapes[1][2] if len(event.input_shapes) > 1 and len(event.input_shapes[1]) == 4 else 0
            kind = {1: "conv 1x1", 3: "conv 3x3"}.get(kernel, "conv other")
        else:
            kind = OP_KINDS.get(event.key)
        if kind:
            kinds[kind] = kinds.get(kind, 0.0) + event.self_cpu_time_total / 1000
    kinds["other"] = max(wall_ms - sum(kinds.values()), 0.0)
    return kinds, shapes


def summary(ms):
    ms = sorted(ms)
    return {"median": ms[len(ms) // 2], "min": ms[0]}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sd2.1-base")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dtype", default=None, choices=["f32", "f16", "bf16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--profile", action="store_true", help="add op_ms: time per kind of op per stage")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype or ("f16" if device.type == "cuda" else "f32")]
    folder = ROOT / "models" / ("demo" if args.arch == "tiny" else pathlib.Path("arch") / args.arch)
    torch.manual_seed(0)
    started = time.perf_counter()
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")).to(device, dtype).eval()
    vae_config = AutoencoderKL.load_config(folder / "vae")
    vae_dtype = torch.float32 if vae_config.get("force_upcast", True) and dtype == torch.float16 else dtype
    vae = AutoencoderKL.from_config(vae_config).to(device, vae_dtype).eval()
    clip = CLIPTextModel(CLIPTextConfig.from_json_file(folder / "text_encoder" / "config.json")).to(device, dtype).eval()
    second_config = folder / "text_encoder_2" / "config.json"
    clip_2 = (CLIPTextModelWithProjection(CLIPTextConfig.from_json_file(second_config)).to(device, dtype).eval()
              if second_config.is_file() else None)
    build_s = time.perf_counter() - started
    tokenizer = CLIPTokenizer.from_pretrained(ROOT / "models" / "demo" / "tokenizer")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = unet.config.sample_size * factor
    width, height = args.width or size, args.height or size
    b = args.batch_size
    ids = tokenizer([""] * b + [PROMPT] * b, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.to(device)
    context = {}

    def encode():
        if clip_2 is None:
            context["c"] = clip(ids).last_hidden_state
            return
        first = clip(ids, output_hidden_states=True).hidden_states[-2]
        second = clip_2(ids, output_hidden_states=True)
        context["c"] = torch.cat([first, second.hidden_states[-2]], dim=-1)
        context["added"] = dict(
            text_embeds=second.text_embeds,
            time_ids=torch.tensor([[height, width, 0, 0, height, width]] * (2 * b), dtype=dtype, device=device),
        )

    text_ms = timed(encode, args.repeat, sync)
    latents = torch.randn((b, unet.config.in_channels, height // factor, width // factor), device=device)
    unet_input = torch.cat([latents, latents]).to(dtype)
    out = {}
    added = {"added_cond_kwargs": context["added"]} if "added" in context else {}
    unet_ms = timed(lambda: out.__setitem__("o", unet(unet_input, 999, encoder_hidden_states=context["c"], **added).sample), args.steps, sync)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True,
                              prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False)
    scheduler.set_timesteps(args.steps)
    output = out["o"].float()

    def ddim():
        uncond, cond = output.chunk(2)
        guided = rescale_noise_cfg(uncond + 7.5 * (cond - uncond), cond, guidance_rescale=0.7)
        scheduler.step(guided, scheduler.timesteps[0], latents)

    ddim_ms = timed(ddim, args.steps, sync)
    vae_ms = timed(lambda: vae.decode(latents.to(vae_dtype) / vae.config.scaling_factor), args.repeat, sync)
    total_s = (sorted(text_ms)[len(text_ms) // 2] + args.steps * (sorted(unet_ms)[len(unet_ms) // 2] + sorted(ddim_ms)[len(ddim_ms) // 2])
               + sorted(vae_ms)[len(vae_ms) // 2]) / 1000
    profile = {}
    if args.profile:
        stages = {
            "text_encode": op_ms(encode),
            "unet_step": op_ms(lambda: unet(unet_input, 999, encoder_hidden_states=context["c"], **added)),
            "vae_decode": op_ms(lambda: vae.decode(latents.to(vae_dtype) / vae.config.scaling_factor)),
        }
        profile = {"op_ms": {stage: ops for stage, (ops, _) in stages.items()},
                   "linear_ms_by_shape": {stage: shapes for stage, (_, shapes) in stages.items()}}
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "tool": "diffusers", "arch": args.arch, "width": width, "height": height, "steps": args.steps, "batch_size": b,
        "dtype": args.dtype or str(dtype).removeprefix("torch.").replace("float", "f"), "device": device.type,
        "threads": torch.get_num_threads(), "build_s": build_s,
        "text_encode_ms": summary(text_ms), "unet_step_ms": summary(unet_ms), "ddim_guidance_ms": summary(ddim_ms),
        "vae_decode_ms": summary(vae_ms), "total_s": total_s, "peak_memory_mb": peak,
        "versions": {"torch": torch.__version__}, **profile,
    }))


if __name__ == "__main__":
    main()
