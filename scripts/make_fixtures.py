#!/usr/bin/env python3
"""A tiny random Stable-Diffusion-2-style model in the diffusers layout, and reference outputs.

Run by hand, never in CI (needs torch, diffusers, transformers and open-clip-torch):

    python3 -m venv .venv-oracle
    .venv-oracle/bin/pip install torch diffusers transformers open-clip-torch safetensors
    .venv-oracle/bin/python scripts/make_fixtures.py

Writes:
- tests/fixtures/tiny-sd/: model_index.json, unet/, text_encoder/, vae/, tokenizer/, scheduler/.
  Its config exercises what real SD checkpoints use and what candle-transformers got wrong: norm
  groups 8 (not 32), several heads per block (the SD 2.x `attention_head_dim` quirk),
  transformer_layers_per_block 2 in one block, linear projections, upcast_attention, exact-erf
  GELU in CLIP and GEGLU. The tokenizer is the real CLIP BPE (vocab.json + merges.txt built from
  the bpe file open-clip-torch ships), so token ids equal real SD's.
- tests/fixtures/tiny-unet-sd1/: a second UNet in SD 1.x style, saved as pickled
  diffusion_pytorch_model.bin (as the paper's ByteDance checkpoints ship): conv projections, an int
  attention_head_dim, only_cross_attention in one block, downsample_padding 0, freq_shift 1,
  flip_sin_to_cos false; with a quick_gelu text encoder config beside it.
- tests/fixtures/refs/models.safetensors: inputs and outputs of each module, in f32.
- tests/fixtures/refs/tokenizer.json: prompts and the ids transformers' CLIPTokenizer gives them.

Every parameter is perturbed with seeded noise so that no layer is an identity (zero-initialised
biases, unit norms) and a wrong layer shows up in the outputs.
"""

import json
import pathlib

import diffusers
import safetensors.torch
import torch
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from clip_bpe import write_tokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
SEED = 20240101
PERTURBATION = 0.05

# Prompts for the tokenizer test: case, punctuation, repeats, apostrophes, digits, accents, CJK,
# emoji, tabs and newlines, HTML entities, very long, empty.
PROMPTS = [
    "",
    "solid black background",
    "A White Background",
    "a photo of an astronaut riding a horse on mars",
    "HELLO world!!",
    "wow!!! really???",
    "don't stop, it's the dog's bone; they're we've I'm you'll he'd",
    "1234567890 and 3.14159 and 1,000,000",
    "café naïve résumé Ångström",
    "東京タワーの夜景",
    "一只猫坐在桌子上",
    "a cat 🐱 with a hat 🎩🎩",
    "tabs\tand\nnewlines\r\nhere",
    "   leading and trailing spaces   ",
    "multiple     spaces    between",
    "&amp; html &lt;entities&gt;",
    "hyphen-ated words and under_scores",
    "email@example.com http://example.com/path?q=1",
    "(parentheses) [brackets] {braces} <angles>",
    "Straße ß ẞ ǅ ﬁ ligature",
    "mixed CASE WoRdS with ALLCAPS",
    "<|startoftext|> inside a prompt <|endoftext|>",
    "emoji only 😀😃😄😁",
    "a, b. c; d: e! f? g",
    "numbers like 8k 4K 1080p 16:9",
    "Ελληνικά και русский текст",
    "العربية نص",
    "हिन्दी पाठ",
    "very " * 100 + "long prompt",
    "masterpiece, best quality, ultra-detailed, 8k, (solid black background:1.4)",
    "a painting in the style of van gogh, oil on canvas, trending on artstation",
    "x" * 300,
]


def perturb(module: torch.nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * PERTURBATION)


def sd2_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        transformer_layers_per_block=(1, 2, 1),
        norm_num_groups=8,
        norm_eps=1e-5,
        attention_head_dim=(2, 4, 4),  # SD 2.x's quirk: these are head counts
        cross_attention_dim=32,
        use_linear_projection=True,
        upcast_attention=True,
        flip_sin_to_cos=True,
        freq_shift=0,
        downsample_padding=1,
    )


def sd1_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 24),
        layers_per_block=(2, 1),
        norm_num_groups=8,
        norm_eps=1e-6,
        attention_head_dim=4,  # int, as SD 1.x: 4 heads everywhere
        cross_attention_dim=32,
        use_linear_projection=False,
        only_cross_attention=(True, False),
        upcast_attention=False,
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=0,
    )


def text_encoder(hidden_act: str) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0,
        projection_dim=32,
    )
    return CLIPTextModel(config)


def vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=0.18215,
    )


def scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        num_train_timesteps=1000,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
    )


@torch.no_grad()
def main() -> None:
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    model_dir = FIXTURES / "tiny-sd"
    refs = {}

    tokenizer_dir = model_dir / "tokenizer"
    write_tokenizer(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    tokenized = [
        tokenizer(p, padding="max_length", max_length=77, truncation=True).input_ids for p in PROMPTS
    ]

    unet, clip, autoencoder = sd2_unet(), text_encoder("gelu"), vae()
    for module in (unet, clip, autoencoder):
        perturb(module, generator)
        module.eval()
    pipe = StableDiffusionPipeline(
        vae=autoencoder,
        text_encoder=clip,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(model_dir, safe_serialization=True)
    # SD 2.x's layout: vocab.json + merges.txt, no tokenizer.json (3.6 MB).
    (tokenizer_dir / "tokenizer.json").unlink(missing_ok=True)
    write_tokenizer(tokenizer_dir)

    # CLIP: two prompts in one batch (candle's CLIP broke for batch > 1).
    ids = torch.tensor([tokenized[1], tokenized[3]], dtype=torch.long)
    refs["clip.input_ids"] = ids.to(torch.int64)
    hidden = clip(ids).last_hidden_state
    refs["clip.last_hidden_state"] = hidden

    # UNet: batch 2, non-square latents, at the first (t = 999) and a late (t = 1) timestep.
    sample = torch.randn((2, 4, 8, 12), generator=generator)
    context = torch.randn((2, 77, 32), generator=generator)
    refs["unet.sample"] = sample
    refs["unet.encoder_hidden_states"] = context
    for t in (999, 1):
        refs[f"unet.out_t{t}"] = unet(sample, t, encoder_hidden_states=context).sample

    # VAE decode of latents / scaling_factor, as the pipeline calls it.
    latents = torch.randn((2, 4, 8, 6), generator=generator)
    refs["vae.latents"] = latents
    refs["vae.decoded"] = autoencoder.decode(latents / autoencoder.config.scaling_factor).sample

    # The SD 1.x-style UNet, pickled, and a quick_gelu text encoder (config + reference only).
    sd1 = sd1_unet()
    perturb(sd1, generator)
    sd1.eval()
    sd1_dir = FIXTURES / "tiny-unet-sd1"
    sd1.save_pretrained(sd1_dir, safe_serialization=False)
    for t in (999, 1):
        refs[f"unet_sd1.out_t{t}"] = sd1(sample, t, encoder_hidden_states=context).sample
    quick = text_encoder("quick_gelu")
    quick.load_state_dict(clip.state_dict())
    quick.eval()
    refs["clip_quick_gelu.last_hidden_state"] = quick(ids).last_hidden_state
    (sd1_dir / "text_encoder_config.json").write_text(quick.config.to_json_string())

    refs_dir = FIXTURES / "refs"
    refs_dir.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in refs.items()},
        refs_dir / "models.safetensors",
        metadata=dict(
            generator="scripts/make_fixtures.py",
            diffusers=diffusers.__version__,
            transformers=transformers.__version__,
            torch=torch.__version__,
        ),
    )
    (refs_dir / "tokenizer.json").write_text(
        json.dumps(
            dict(
                generator="scripts/make_fixtures.py",
                transformers=transformers.__version__,
                cases=[dict(prompt=p, ids=i) for p, i in zip(PROMPTS, tokenized)],
            ),
            ensure_ascii=False,
            indent=0,
        )
    )
    total = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
    print(f"wrote {model_dir}, {sd1_dir}, {refs_dir}; tests/fixtures now {total / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
