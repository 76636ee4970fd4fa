#!/usr/bin/env python3
"""Reference runs for A1111's prompt language wired into generation (tests/prompt_pipeline.rs).
Run by hand, never in CI:

    .venv-oracle/bin/python scripts/make_prompt_pipeline_refs.py

The conditioning is built here as A1111 builds it (the chunking and emphasis formulas of
scripts/make_prompt_refs.py, a re-derivation from the written spec, and transformers'
CLIPTextModel run chunk by chunk), then fed to diffusers as `prompt_embeds` /
`negative_prompt_embeds`, with stored initial latents:

- `weighted_two_chunks`: a weighted 2-chunk prompt and a 2-chunk negative prompt through
  diffusers' StableDiffusionPipeline.
- `separate_passes`: the same prompt against a 1-chunk negative prompt. diffusers needs equal
  lengths, so the reference is a loop written here with diffusers' parts (UNet, DDIMScheduler,
  rescale_noise_cfg) that runs the UNet twice per step, as A1111 does by default.
- `pad_conds`: that pair with the negative padded by the empty prompt's chunk (A1111's "Pad
  prompt/negative prompt"), through the pipeline.
- `clip_skip.*`: hidden states for `--clip-skip 2`: SD 1.x-style (quick_gelu) encoder of
  tests/fixtures/tiny-sdxl/text_encoder, `hidden_states[-2]` then `final_layer_norm` (A1111,
  diffusers `clip_skip=1`); SDXL, both encoders' `hidden_states[-3]` (diffusers' rule,
  `hidden_states[-(clip_skip + 2)]` with `clip_skip=1`), and the pooled output of the first
  chunk.

Writes tests/fixtures/refs/prompt_pipeline.safetensors and tests/fixtures/refs/prompt_pipeline.json.
"""

import json
import pathlib
import sys

import diffusers
import numpy as np
import safetensors.torch
import torch
import transformers
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from make_prompt_refs import chunk, original  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests" / "fixtures" / "tiny-sd"
SDXL = ROOT / "tests" / "fixtures" / "tiny-sdxl"
REFS = ROOT / "tests" / "fixtures" / "refs"
SEED = 31
STEPS = 10
GUIDANCE = 7.5
PHI = 0.7

PROMPT = ", ".join(["(red:1.3) cat", "[blue] dog", "((green bird))"] * 8) + ", (sun:0.5) over the hills"
NEGATIVE_LONG = "(blurry:1.2), lowres BREAK [jpeg artifacts]"
NEGATIVE_SHORT = "blurry"


@torch.no_grad()
def encode(model, tokenizer, text):
    """A1111's conditioning of `text`: each chunk through the encoder, `original` emphasis, joined."""
    chunks = chunk(tokenizer, text)["chunks"]
    zs = []
    for c in chunks:
        z = model(torch.tensor([c["ids"]])).last_hidden_state.numpy()
        zs.append(original(z, np.array(c["weights"])))
    return torch.from_numpy(np.concatenate(zs, axis=1)), len(chunks)


@torch.no_grad()
def two_pass_reference(pipe, latents, cond, uncond):
    """DDIM with CFG and its rescale, the UNet run on uncond and cond apart."""
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    for t in scheduler.timesteps:
        out_uncond = pipe.unet(latents, t, encoder_hidden_states=uncond).sample
        out_cond = pipe.unet(latents, t, encoder_hidden_states=cond).sample
        guided = out_uncond + GUIDANCE * (out_cond - out_uncond)
        guided = rescale_noise_cfg(guided, out_cond, guidance_rescale=PHI)
        latents = scheduler.step(guided, t, latents, eta=0.0).prev_sample
    return latents


def to_uint8(pipe, latents):
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


@torch.no_grad()
def clip_skip_refs(tensors):
    prompt = "a (red:1.2) cat on a mat"
    # SD 1.x-style: OpenAI CLIP (quick_gelu), padded with EOS.
    tokenizer = CLIPTokenizer.from_pretrained(SDXL / "tokenizer")
    model = CLIPTextModel.from_pretrained(SDXL / "text_encoder").eval()
    assert model.config.hidden_act == "quick_gelu"
    zs = []
    for c in chunk(tokenizer, prompt)["chunks"]:
        out = model(torch.tensor([c["ids"]]), output_hidden_states=True)
        norm = getattr(model, "text_model", model).final_layer_norm
        z = norm(out.hidden_states[-2]).numpy()
        zs.append(original(z, np.array(c["weights"])))
    tensors["clip_skip.sd1"] = torch.from_numpy(np.concatenate(zs, axis=1))
    # SDXL: hidden_states[-3] of both encoders (no norm), weighed per encoder, joined on channels.
    tokenizer_2 = CLIPTokenizer.from_pretrained(SDXL / "tokenizer_2")
    model_2 = CLIPTextModelWithProjection.from_pretrained(SDXL / "text_encoder_2").eval()
    parts, pooled = [], None
    for tok, enc in ((tokenizer, model), (tokenizer_2, model_2)):
        zs = []
        for i, c in enumerate(chunk(tok, prompt)["chunks"]):
            out = enc(torch.tensor([c["ids"]]), output_hidden_states=True)
            zs.append(original(out.hidden_states[-3].numpy(), np.array(c["weights"])))
            if enc is model_2 and i == 0:
                pooled = out.text_embeds
        parts.append(np.concatenate(zs, axis=1))
    tensors["clip_skip.sdxl"] = torch.from_numpy(np.concatenate(parts, axis=2))
    tensors["clip_skip.sdxl_pooled"] = pooled
    return prompt


@torch.no_grad()
def main():
    generator = torch.Generator().manual_seed(SEED)
    pipe = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    tokenizer = CLIPTokenizer.from_pretrained(MODEL / "tokenizer")
    model = pipe.text_encoder.eval()
    cond, n = encode(model, tokenizer, PROMPT)
    assert n == 2, n
    uncond_long, n = encode(model, tokenizer, NEGATIVE_LONG)
    assert n == 2, n
    uncond_short, n = encode(model, tokenizer, NEGATIVE_SHORT)
    assert n == 1, n
    empty, _ = encode(model, tokenizer, "")
    base = ["--prompt", PROMPT, "--steps", str(STEPS)]

    tensors, cases = {}, {}

    def store(name, initial, final, args):
        tensors[f"{name}.initial"] = initial.clone()
        tensors[f"{name}.final"] = final
        tensors[f"{name}.image"] = to_uint8(pipe, final)
        cases[name] = args

    def run_pipe(initial, c, u):
        return pipe(
            prompt_embeds=c, negative_prompt_embeds=u, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
            guidance_rescale=PHI, latents=initial.clone(), eta=0.0, height=16, width=16, output_type="latent",
        ).images

    initial = torch.randn((1, 4, 8, 8), generator=generator)
    final = run_pipe(initial, cond, uncond_long)
    # The two-pass loop equals the pipeline when the lengths agree (what makes it a fair oracle).
    check = two_pass_reference(pipe, initial.clone(), cond, uncond_long)
    print(f"two-pass loop vs pipeline: {(check - final).abs().max().item():.3g} max abs")
    store("weighted_two_chunks", initial, final, base + ["--negative-prompt", NEGATIVE_LONG])

    initial = torch.randn((1, 4, 8, 8), generator=generator)
    store(
        "separate_passes", initial, two_pass_reference(pipe, initial.clone(), cond, uncond_short),
        base + ["--negative-prompt", NEGATIVE_SHORT],
    )
    padded = torch.cat([uncond_short, empty], dim=1)
    store(
        "pad_conds", initial, run_pipe(initial, cond, padded),
        base + ["--negative-prompt", NEGATIVE_SHORT, "--pad-conds"],
    )
    gap = (tensors["pad_conds.final"] - tensors["separate_passes.final"]).abs().max().item()
    print(f"pad_conds vs separate passes: {gap:.3g} max abs")

    clip_prompt = clip_skip_refs(tensors)
    # Every value a list of strings (tests/common reads the cases as sdfix arguments).
    refs = dict(cases, clip_skip_prompt=[clip_prompt])
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        REFS / "prompt_pipeline.safetensors",
        metadata=dict(generator="scripts/make_prompt_pipeline_refs.py", diffusers=diffusers.__version__,
                      transformers=transformers.__version__, torch=torch.__version__),
    )
    (REFS / "prompt_pipeline.json").write_text(json.dumps(refs, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(cases)} cases and the clip-skip states")


if __name__ == "__main__":
    main()
