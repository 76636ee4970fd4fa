#!/usr/bin/env python3
"""The tiny fixture model (tests/fixtures/tiny-sd) as LDM single files, a kohya-format LoRA for it,
and diffusers' outputs with that LoRA, for tests/singlefile.rs and tests/lora.rs.

Run by hand after scripts/make_fixtures.py, never in CI (diffusers is the oracle; no network: the
configs come from the local tiny-sd folder):

    HF_HUB_OFFLINE=1 .venv-oracle/bin/python scripts/make_single_file_fixtures.py

Writes tests/fixtures/single-file/:
- tiny-sd2.safetensors: the model in the LDM layout of SD 2.x (OpenCLIP text keys: fused
  in_proj, positional_embedding, ln_final, resblocks), f32, plus the junk real checkpoints carry
  (betas, alphas_cumprod, model_ema.decay, logit_scale, text_projection) and one key no rule knows.
  The key renames here are written from the LDM module layout, independently of sdfix's; the file
  is then loaded back with diffusers' own `from_single_file` and every tensor compared.
- tiny-sd2-f16.ckpt: the same state dict in f16, pickled by torch.save under "state_dict" (as
  LDM's trainer saves), with a `global_step`.
- The SD 1.x layout (CLIP-L keys under cond_stage_model.transformer.) is checked here with
  `from_single_file` too but not written: tests/singlefile.rs builds it from tiny-sd2.safetensors
  and the folder's text encoder.
- tiny-lora.safetensors: a kohya-format LoRA (lora_unet_*, lora_te_*; lora_down, lora_up, alpha)
  with random rank-4 weights (alpha 2) on linear layers, a 1x1 and a 3x3 convolution of the UNet and on
  the text encoder; lora.safetensors + lora.json: diffusers' final latents with it
  (`load_lora_weights` + `fuse_lora` for the UNet; the text encoder's part merged here by kohya's
  formula, as this diffusers applies only part of it: see merge_text_encoder_lora), from given
  initial latents,
  and the sdfix arguments.

- pipeline.safetensors: diffusers' own `from_single_file` pipeline on tiny-sd2.safetensors (DDIM,
  trailing, zero SNR, v, CFG 7.5 rescaled 0.7, 10 steps, "a blue square"): initial and final
  latents.
- arch_keys.json: the LDM keys and shapes of SD 1.5 and SD 2.1 (from models/arch's configs, no
  weights; SD 2.1 with OpenCLIP's 24th layer, which SD 2 does not use), for the config-synthesis
  test.

With `--sdfix PATH` (a built binary) it instead checks `sdfix convert`: the folder it writes from
tiny-sd2.safetensors loads with diffusers' `from_pretrained` and equals tiny-sd tensor for tensor.

With `--from-folder DIR --out FILE` it instead writes a diffusers folder (e.g. a random full-size
one from scripts/make_random_model.py) as an LDM single file, for load-time and memory runs; an
OpenCLIP 24th layer (a copy of the last) is added to SD 2.x text encoders, as real files have.
"""

import argparse
import json
import pathlib
import subprocess
import tempfile

import diffusers
import safetensors.torch
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests" / "fixtures" / "tiny-sd"
OUT = ROOT / "tests" / "fixtures" / "single-file"
SEED = 19

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def resnet_ldm(rest: str) -> str:
    head, tail = rest.split(".", 1)
    return f"{RESNET[head]}.{tail}"


def unet_to_ldm(unet) -> dict:
    """diffusers UNet2DConditionModel -> LDM openaimodel.UNetModel keys (layers_per_block uniform)."""
    cfg = unet.config
    lpb = cfg.layers_per_block
    attention_up = [t.startswith("CrossAttn") for t in cfg.up_block_types]
    out = {}
    for key, value in unet.state_dict().items():
        p = key.split(".")
        if key.startswith("time_embedding.linear_1."):
            new = "time_embed.0." + p[-1]
        elif key.startswith("time_embedding.linear_2."):
            new = "time_embed.2." + p[-1]
        elif key.startswith("conv_in."):
            new = "input_blocks.0.0." + p[-1]
        elif key.startswith("conv_norm_out."):
            new = "out.0." + p[-1]
        elif key.startswith("conv_out."):
            new = "out.2." + p[-1]
        elif p[0] == "down_blocks":
            level, kind = int(p[1]), p[2]
            rest = ".".join(p[4:])
            if kind == "resnets":
                new = f"input_blocks.{1 + level * (lpb + 1) + int(p[3])}.0.{resnet_ldm(rest)}"
            elif kind == "attentions":
                new = f"input_blocks.{1 + level * (lpb + 1) + int(p[3])}.1.{rest}"
            else:  # downsamplers.0.conv
                new = f"input_blocks.{(level + 1) * (lpb + 1)}.0.op.{p[-1]}"
        elif p[0] == "mid_block":
            rest = ".".join(p[3:])
            if p[1] == "attentions":
                new = f"middle_block.1.{rest}"
            else:
                new = f"middle_block.{0 if p[2] == '0' else 2}.{resnet_ldm(rest)}"
        elif p[0] == "up_blocks":
            up, kind = int(p[1]), p[2]
            rest = ".".join(p[4:])
            if kind == "resnets":
                new = f"output_blocks.{up * (lpb + 1) + int(p[3])}.0.{resnet_ldm(rest)}"
            elif kind == "attentions":
                new = f"output_blocks.{up * (lpb + 1) + int(p[3])}.1.{rest}"
            else:  # upsamplers.0.conv
                new = f"output_blocks.{up * (lpb + 1) + lpb}.{2 if attention_up[up] else 1}.conv.{p[-1]}"
        else:
            raise KeyError(key)
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(vae) -> dict:
    levels = len(vae.config.block_out_channels)
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
    out = {}
    for key, value in vae.state_dict().items():
        p = key.split(".")
        if p[0] in ("quant_conv", "post_quant_conv"):
            new = key
        elif p[1] in ("conv_in", "conv_out"):
            new = key
        elif p[1] == "conv_norm_out":
            new = f"{p[0]}.norm_out.{p[-1]}"
        elif p[1] == "mid_block" and p[2] == "resnets":
            rest = ".".join(p[4:]).replace("conv_shortcut", "nin_shortcut")
            new = f"{p[0]}.mid.block_{int(p[3]) + 1}.{rest}"
        elif p[1] == "mid_block":
            new = f"{p[0]}.mid.attn_1.{attention[p[4]]}.{p[-1]}"
            if p[-1] == "weight" and p[4] != "group_norm":
                value = value[:, :, None, None]  # LDM keeps them as 1x1 convolutions
        elif p[1] == "down_blocks":
            if p[3] == "resnets":
                rest = ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut")
                new = f"encoder.down.{p[2]}.block.{p[4]}.{rest}"
            else:
                new = f"encoder.down.{p[2]}.downsample.conv.{p[-1]}"
        elif p[1] == "up_blocks":
            level = levels - 1 - int(p[2])  # the decoder's levels are numbered in reverse
            if p[3] == "resnets":
                rest = ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut")
                new = f"decoder.up.{level}.block.{p[4]}.{rest}"
            else:
                new = f"decoder.up.{level}.upsample.conv.{p[-1]}"
        else:
            raise KeyError(key)
        out["first_stage_model." + new] = value
    return out


def text_to_open_clip(text_encoder, generator) -> dict:
    # transformers 5 names the weights without "text_model." (4.x with it).
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    hidden = text_encoder.config.hidden_size
    pre = "cond_stage_model.model."
    out = {
        pre + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        pre + "positional_embedding": sd["embeddings.position_embedding.weight"],
        pre + "ln_final.weight": sd["final_layer_norm.weight"],
        pre + "ln_final.bias": sd["final_layer_norm.bias"],
        pre + "text_projection": torch.randn((hidden, hidden), generator=generator),
        pre + "logit_scale": torch.tensor(4.6052),
    }
    for n in range(text_encoder.config.num_hidden_layers):
        src = f"encoder.layers.{n}."
        dst = f"{pre}transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [sd[src + f"self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
            )
            for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                         ("mlp.c_proj", "mlp.fc2"), ("attn.out_proj", "self_attn.out_proj")):
                out[dst + f"{a}.{kind}"] = sd[src + f"{b}.{kind}"]
    return out


def junk(scheduler) -> dict:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return {
        "betas": betas.float(),
        "alphas_cumprod": torch.cumprod(1 - betas, 0).float(),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(0, dtype=torch.int32),
        "extra.unknown_key": torch.zeros(3),
    }


def assert_same(reference: dict, loaded: dict, what: str) -> None:
    missing = set(reference) - set(loaded)
    assert not missing, f"{what}: missing {sorted(missing)[:5]}"
    for k, v in reference.items():
        if not torch.equal(v, loaded[k]):
            raise AssertionError(f"{what}: {k} differs by {(v - loaded[k]).abs().max()}")


def check_single_file(path: pathlib.Path, pipe, what: str, dtype=torch.float32) -> None:
    """diffusers' from_single_file (with the local tiny-sd configs) gives back every tensor."""
    loaded = StableDiffusionPipeline.from_single_file(
        str(path), config=str(MODEL), local_files_only=True, safety_checker=None, torch_dtype=dtype
    )
    for name in ("unet", "vae", "text_encoder"):
        reference = {k: v.to(dtype) for k, v in getattr(pipe, name).state_dict().items()}
        assert_same(reference, getattr(loaded, name).state_dict(), f"{what} {name}")
    print(f"{what}: diffusers from_single_file gives back every tensor")


def kohya_lora(pipe, generator) -> dict:
    """Random low-rank updates on a linear layer, a 1x1 and a 3x3 conv, and the text encoder."""
    unet = dict(pipe.unet.named_modules())
    text = {k.removeprefix("text_model."): m for k, m in pipe.text_encoder.named_modules()}
    # One rank and alpha for every module: with mixed ranks, diffusers 0.42.1 took the most common
    # alpha for attn2.to_v (rank 2, alpha 1) instead of its own, a scale of 1 where kohya's
    # alpha / rank is 0.5 (its alpha_pattern missed that module), while conv_shortcut (also rank 2)
    # got its own; sdfix follows kohya.
    targets = [
        ("lora_unet_", unet, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 4),
        ("lora_unet_", unet, "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v", 4),
        ("lora_unet_", unet, "mid_block.attentions.0.proj_in", 4),
        ("lora_unet_", unet, "up_blocks.1.resnets.0.conv_shortcut", 4),  # 1x1 conv
        ("lora_unet_", unet, "down_blocks.1.resnets.0.conv1", 4),  # 3x3 conv
        ("lora_te_", text, "encoder.layers.0.self_attn.q_proj", 4),
        ("lora_te_", text, "encoder.layers.1.mlp.fc1", 4),
    ]
    out = {}
    for prefix, modules, name, rank in targets:
        module = modules[name]
        # kohya names text encoder modules with transformers 4's "text_model." level.
        key = prefix + ("text_model." if prefix == "lora_te_" else "") + name
        key = key.replace(".", "_")
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size
            down = torch.randn((rank, module.in_channels, *k), generator=generator) * 0.3
            up = torch.randn((module.out_channels, rank, 1, 1), generator=generator) * 0.3
        else:
            down = torch.randn((rank, module.in_features), generator=generator) * 0.3
            up = torch.randn((module.out_features, rank), generator=generator) * 0.3
        out[key + ".lora_down.weight"] = down
        out[key + ".lora_up.weight"] = up
        out[key + ".alpha"] = torch.tensor(float(rank) / 2)  # scale alpha / rank = 0.5
    return out


@torch.no_grad()
def merge_text_encoder_lora(pipe, lora_path: pathlib.Path, weight: float) -> None:
    """The text encoder's part of the LoRA, merged by kohya's formula W += w * alpha/rank * up @ down.

    diffusers 0.42.1 with transformers 5 (whose CLIPTextModel has no `text_model` level) applies
    kohya's lora_te_* keys only in part: the MLP's fc1 is fused, self_attn.q_proj is dropped as
    UNEXPECTED (converted to the old `to_q_lora` naming). So the text encoder is reset to its own
    weights after fuse_lora and gets the whole text-encoder part here; the UNet's part is diffusers'
    own load_lora_weights + fuse_lora.
    """
    lora = safetensors.torch.load_file(lora_path)
    modules = {k.removeprefix("text_model.").replace(".", "_"): m for k, m in pipe.text_encoder.named_modules()}
    for key in lora:
        if not (key.startswith("lora_te_") and key.endswith(".lora_down.weight")):
            continue
        module_key = key.removeprefix("lora_te_text_model_").removesuffix(".lora_down.weight")
        down = lora[key]
        up = lora[key.replace("lora_down", "lora_up")]
        alpha = lora[key.replace(".lora_down.weight", ".alpha")].item()
        module = modules[module_key]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(module.weight.shape)
        module.weight.data.add_(delta, alpha=weight * alpha / down.shape[0])


@torch.no_grad()
def lora_refs(lora_path: pathlib.Path, generator) -> None:
    cases = {
        "lora_1": (1.0, ["--prompt", "a red circle", "--steps", "10", "--lora", "LORA:1"]),
        "lora_0.6": (0.6, ["--prompt", "a red circle", "--steps", "10", "--lora", "LORA:0.6"]),
    }
    tensors, args = {}, {}
    initial = torch.randn((1, 4, 8, 8), generator=generator)
    tensors["initial"] = initial
    for name, (weight, sdfix_args) in cases.items():
        pipe = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        text_encoder_weights = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
        pipe.load_lora_weights(str(lora_path.parent), weight_name=lora_path.name)
        pipe.fuse_lora(lora_scale=weight)
        pipe.unload_lora_weights()  # the fused weights stay
        pipe.text_encoder.load_state_dict(text_encoder_weights)
        merge_text_encoder_lora(pipe, lora_path, weight)
        final = pipe(
            prompt="a red circle", num_inference_steps=10, guidance_scale=7.5, guidance_rescale=0.7,
            latents=initial.clone(), eta=0.0, height=16, width=16, output_type="latent",
        ).images
        tensors[f"{name}.final"] = final
        args[name] = sdfix_args
    pipe = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    tensors["no_lora.final"] = pipe(
        prompt="a red circle", num_inference_steps=10, guidance_scale=7.5, guidance_rescale=0.7,
        latents=initial.clone(), eta=0.0, height=16, width=16, output_type="latent",
    ).images
    gap = (tensors["lora_1.final"] - tensors["no_lora.final"]).abs().max().item()
    assert gap > 1e-2, f"the LoRA barely changes the output ({gap})"
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in tensors.items()}, OUT / "lora.safetensors",
        metadata=dict(generator="scripts/make_single_file_fixtures.py", diffusers=diffusers.__version__,
                      torch=torch.__version__),
    )
    (OUT / "lora.json").write_text(json.dumps(args, indent=1) + "\n")
    print(f"LoRA refs: weight 1 moves the final latents by {gap:.3g} max abs")


def check_convert(sdfix: str, pipe) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "converted"
        subprocess.run([sdfix, "convert", str(OUT / "tiny-sd2.safetensors"), "--out", str(out),
                        "--config", str(MODEL)], check=True)
        loaded = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
        for name in ("unet", "vae", "text_encoder"):
            assert_same(getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict(), f"convert {name}")
    print("sdfix convert: diffusers from_pretrained gives back every tensor")


def text_to_clip_l(text_encoder) -> dict:
    clip = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    return {f"cond_stage_model.transformer.text_model.{k}": v for k, v in clip.items()}


def is_open_clip(text_encoder) -> bool:
    return text_encoder.config.hidden_act == "gelu"


def with_unused_last_layer(open_clip: dict, layers: int) -> dict:
    """Real SD 2.x files hold OpenCLIP's 24 layers; SD 2 conditions on the 23rd (penultimate)."""
    pre = "cond_stage_model.model.transformer.resblocks."
    extra = {k.replace(f"{pre}{layers - 1}.", f"{pre}{layers}."): v.clone() for k, v in open_clip.items()
             if k.startswith(f"{pre}{layers - 1}.")}
    return {**open_clip, **extra}


def ldm_state_dict(pipe_parts, generator) -> dict:
    unet, vae, text_encoder = pipe_parts
    if is_open_clip(text_encoder):
        text = with_unused_last_layer(text_to_open_clip(text_encoder, generator),
                                      text_encoder.config.num_hidden_layers)
    else:
        text = text_to_clip_l(text_encoder)
    return {**unet_to_ldm(unet), **vae_to_ldm(vae), **text}


@torch.no_grad()
def single_file_pipeline_refs(generator) -> None:
    """diffusers' own from_single_file pipeline on tiny-sd2.safetensors: final latents from given
    initial latents (tests/singlefile.rs compares sdfix on the same file)."""
    pipe = StableDiffusionPipeline.from_single_file(
        str(OUT / "tiny-sd2.safetensors"), config=str(MODEL), local_files_only=True, safety_checker=None
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    initial = torch.randn((1, 4, 8, 8), generator=generator)
    final = pipe(
        prompt="a blue square", num_inference_steps=10, guidance_scale=7.5, guidance_rescale=0.7,
        latents=initial.clone(), eta=0.0, height=16, width=16, output_type="latent",
    ).images
    safetensors.torch.save_file(
        {"initial": initial.contiguous(), "final": final.contiguous()}, OUT / "pipeline.safetensors",
        metadata=dict(generator="scripts/make_single_file_fixtures.py", diffusers=diffusers.__version__,
                      torch=torch.__version__),
    )
    print("pipeline.safetensors: diffusers' from_single_file pipeline, 10 steps")


def arch_keys() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    listing = {}
    for arch in ("sd1.5", "sd2.1"):
        folder = ROOT / "models" / "arch" / arch
        with torch.device("meta"):
            parts = (
                UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
                AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
                CLIPTextModel(CLIPTextConfig.from_json_file(folder / "text_encoder" / "config.json")),
            )
            state = ldm_state_dict(parts, None)
        listing[arch] = sorted([k, list(v.shape)] for k, v in state.items())
    (OUT / "arch_keys.json").write_text(json.dumps(dict(generator="scripts/make_single_file_fixtures.py",
                                                        diffusers=diffusers.__version__, archs=listing)) + "\n")
    print(f"arch_keys.json: {', '.join(f'{a} {len(k)} keys' for a, k in listing.items())}")


def from_folder(folder: pathlib.Path, out: pathlib.Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    state = ldm_state_dict((pipe.unet, pipe.vae, pipe.text_encoder), torch.Generator().manual_seed(SEED))
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, out)
    print(f"wrote {out}: {len(state)} tensors, {out.stat().st_size / 1e9:.2f} GB")


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sdfix", help="a built sdfix binary, to check `sdfix convert` with diffusers")
    parser.add_argument("--from-folder", type=pathlib.Path, help="a diffusers folder to write as a single file")
    parser.add_argument("--out", type=pathlib.Path, help="the single file --from-folder writes")
    args = parser.parse_args()
    if args.from_folder:
        from_folder(args.from_folder, args.out)
        return
    generator = torch.Generator().manual_seed(SEED)
    OUT.mkdir(parents=True, exist_ok=True)
    pipe = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)
    if args.sdfix:
        check_convert(args.sdfix, pipe)
        return

    body = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae)}
    sd2 = {**body, **text_to_open_clip(pipe.text_encoder, generator), **junk(pipe.scheduler)}
    metadata = dict(generator="scripts/make_single_file_fixtures.py", diffusers=diffusers.__version__,
                    torch=torch.__version__)
    sd2_path = OUT / "tiny-sd2.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd2.items()}, sd2_path, metadata=metadata)
    check_single_file(sd2_path, pipe, "SD 2.x layout")

    with tempfile.TemporaryDirectory() as tmp:
        clip = {k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()}
        sd1 = {**body, **{f"cond_stage_model.transformer.text_model.{k}": v for k, v in clip.items()}}
        sd1_path = pathlib.Path(tmp) / "tiny-sd1.safetensors"
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd1.items()}, sd1_path)
        check_single_file(sd1_path, pipe, "SD 1.x layout")

    ckpt_path = OUT / "tiny-sd2-f16.ckpt"
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd2.items()}
    torch.save({"state_dict": half, "global_step": 1000}, ckpt_path)
    check_single_file(ckpt_path, pipe, "SD 2.x .ckpt (f16)", dtype=torch.float16)

    lora_path = OUT / "tiny-lora.safetensors"
    safetensors.torch.save_file(kohya_lora(pipe, generator), lora_path, metadata=metadata)
    lora_refs(lora_path, generator)
    single_file_pipeline_refs(generator)
    arch_keys()
    total = sum(f.stat().st_size for f in OUT.iterdir())
    print(f"wrote {OUT}: {total / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
