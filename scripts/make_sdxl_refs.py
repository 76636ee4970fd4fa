#!/usr/bin/env python3
"""A tiny random SDXL in the diffusers layout, and diffusers' SDXL pipelines run on it, for
tests/sdxl.rs. Run by hand, never in CI (after scripts/make_fixtures.py, whose tokenizer it reuses):

    .venv-oracle/bin/python scripts/make_sdxl_refs.py

Writes:
- tests/fixtures/tiny-sdxl/: model_index.json (StableDiffusionXLPipeline,
  force_zeros_for_empty_prompt), unet/ (`addition_embed_type = "text_time"`, no attention at the
  top level, transformer depths [1, 1, 2] so the mid block is 2 deep, heads from the
  `attention_head_dim` quirk, `upcast_attention: null` as SDXL's config has it), text_encoder/
  (CLIP-L style: quick_gelu, width 32), text_encoder_2/ (OpenCLIP bigG style,
  CLIPTextModelWithProjection: gelu, width 48, projection 40, `eos_token_id` 2 as SDXL's config),
  tokenizer/ (pads with EOS) and tokenizer_2/ (pads with "!"), vae/ (scaling factor 0.13025,
  force_upcast), scheduler/ (Euler, v-prediction, zero terminal SNR, trailing: the NoobAI-XL V-Pred
  kind of model). The two text encoders have different widths (32 + 48 = cross-attention 80), unlike
  diffusers' own test fixtures, so a swapped or mis-sliced encoder shows.
- tests/fixtures/tiny-sdxl-inpaint/: the same with a 9-channel UNet (other parts linked).
- tests/fixtures/refs/sdxl.{safetensors,json}: for each case the initial noise, diffusers' final
  latents and the 8-bit image, and sdfix's arguments.
- tests/fixtures/refs/sdxl_vae.safetensors: one case's picture decoded by another VAE (`--vae`).
- tests/fixtures/refs/sdxl_finetune.safetensors: one fine-tuning step's loss and UNet gradients.

As scripts/make_img2img_refs.py does, the img2img and inpainting pipelines take the VAE posterior's
mean (`sdfix --vae-encode mean`) and the noise stored here (`sdfix --latents`).
"""

import argparse
import json
import os
import pathlib
import shutil

import diffusers
import safetensors.torch
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as img2img_module
from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_inpaint as inpaint_module
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from make_img2img_refs import pattern, rectangle_mask

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
MODEL = FIXTURES / "tiny-sdxl"
INPAINT_MODEL = FIXTURES / "tiny-sdxl-inpaint"
REFS = FIXTURES / "refs"
SEED = 20260101
PERTURBATION = 0.05
TIME_EMBED = 8
PROJECTION = 40

NEXT_NOISE: list = []


def stored_noise(shape, generator=None, device=None, dtype=None, layout=None):
    noise = NEXT_NOISE.pop(0)
    assert tuple(noise.shape) == tuple(shape), (noise.shape, shape)
    return noise.clone().to(dtype=dtype)


def mean_latents(encoder_output, generator=None, sample_mode="sample"):
    return encoder_output.latent_dist.mode()


for module in (img2img_module, inpaint_module):
    module.randn_tensor = stored_noise
    module.retrieve_latents = mean_latents


def perturb(module: torch.nn.Module, seed: int) -> None:
    """Seeded noise on every parameter, so that no layer is an identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * PERTURBATION)


def unet_config(in_channels: int) -> dict:
    return dict(
        sample_size=16,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 48),
        layers_per_block=2,
        norm_num_groups=8,
        cross_attention_dim=32 + 48,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 2, 3),
        use_linear_projection=True,
        upcast_attention=None,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=PROJECTION + 6 * TIME_EMBED,
    )


def make_model() -> None:
    torch.manual_seed(SEED)
    if MODEL.exists():
        shutil.rmtree(MODEL)
    unet = UNet2DConditionModel(**unet_config(4))
    perturb(unet, 1)
    common = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        hidden_act="quick_gelu", projection_dim=32, **common,
    ))
    perturb(text_encoder, 2)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3,
        hidden_act="gelu", projection_dim=PROJECTION, **common,
    ))
    perturb(text_encoder_2, 3)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=32,
        scaling_factor=0.13025, force_upcast=True,
    )
    perturb(vae, 4)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction",
        rescale_betas_zero_snr=True, timestep_spacing="trailing", steps_offset=1,
    )
    # tiny-sd's tokenizer is the real CLIP BPE and pads with "!" (OpenCLIP, SDXL's tokenizer_2);
    # SDXL's first tokenizer pads with EOS.
    tokenizer_2 = CLIPTokenizer.from_pretrained(FIXTURES / "tiny-sd" / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(FIXTURES / "tiny-sd" / "tokenizer", pad_token="<|endoftext|>")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(MODEL)
    link_tokenizers()
    # The keys SDXL's own scheduler_config.json adds (DDIM reads clip_sample, which defaults to true).
    scheduler_path = MODEL / "scheduler" / "scheduler_config.json"
    values = json.loads(scheduler_path.read_text())
    values.update(clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True, sample_max_value=1.0)
    scheduler_path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")

    if INPAINT_MODEL.exists():
        shutil.rmtree(INPAINT_MODEL)
    INPAINT_MODEL.mkdir()
    inpaint_unet = UNet2DConditionModel(**unet_config(9))
    perturb(inpaint_unet, 5)
    inpaint_unet.save_pretrained(INPAINT_MODEL / "unet")
    for part in ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"):
        os.symlink(f"../tiny-sdxl/{part}", INPAINT_MODEL / part)
    index = json.loads((MODEL / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLInpaintPipeline"
    (INPAINT_MODEL / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def link_tokenizers() -> None:
    """tiny-sd's vocabulary files instead of two 3.5 MB tokenizer.json copies: tokenizer_2 is
    tiny-sd's tokenizer (pads with "!"); tokenizer links its vocab and merges and pads with EOS."""
    for part in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(MODEL / part)
    os.symlink("../tiny-sd/tokenizer", MODEL / "tokenizer_2")
    folder = MODEL / "tokenizer"
    folder.mkdir()
    for name in ("vocab.json", "merges.txt"):
        os.symlink(f"../../tiny-sd/tokenizer/{name}", folder / name)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        values = json.loads((FIXTURES / "tiny-sd" / "tokenizer" / name).read_text())
        values["pad_token"] = "<|endoftext|>"
        (folder / name).write_text(json.dumps(values, indent=2) + "\n")


def to_uint8(vae, latents: torch.Tensor) -> torch.Tensor:
    image = vae.decode(latents / vae.config.scaling_factor).sample
    return ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


PROMPT = "solid black background"
NEGATIVE = "blurry, low quality"
DDIM = (DDIMScheduler, {})
EULER = (EulerDiscreteScheduler, {})
# name: (pipeline kind, sdfix args, scheduler class + overrides, call arguments, (w, h), batch).
CASES = {
    "vpred_zsnr_ddim": (
        "txt2img", ["--steps", "10", "--guidance", "5"], DDIM,
        dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=5.0, guidance_rescale=0.7),
        (32, 32), 1,
    ),
    "euler": (
        "txt2img", ["--steps", "8", "--guidance", "4.5", "--sampler", "euler", "--terminal-alpha-bar", "diffusers"],
        EULER,
        dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=4.5, guidance_rescale=0.7),
        (32, 32), 1,
    ),
    "empty_negative_zeroed": (
        "txt2img", ["--steps", "10", "--guidance", "5"], DDIM,
        dict(prompt=PROMPT, negative_prompt=None, num_inference_steps=10, guidance_scale=5.0, guidance_rescale=0.7),
        (48, 32), 2,
    ),
    "empty_negative_encoded": (
        "txt2img", ["--steps", "10", "--guidance", "5", "--encode-empty-negative"], DDIM,
        dict(prompt=PROMPT, negative_prompt="", num_inference_steps=10, guidance_scale=5.0, guidance_rescale=0.7),
        (32, 32), 1,
    ),
    "stock_epsilon_leading": (
        "txt2img", ["--steps", "10", "--guidance", "7", "--prediction", "epsilon", "--baseline"],
        (DDIMScheduler, dict(prediction_type="epsilon", rescale_betas_zero_snr=False, timestep_spacing="leading")),
        dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=7.0),
        (32, 32), 1,
    ),
    "micro_conditioning": (
        "txt2img",
        ["--steps", "10", "--guidance", "5", "--original-size", "24x40", "--crop-top-left", "2,4",
         "--target-size", "48x32", "--negative-original-size", "64x64", "--negative-crop-top-left", "8,0",
         "--negative-target-size", "32x16"],
        DDIM,
        dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=5.0, guidance_rescale=0.7,
             original_size=(40, 24), crops_coords_top_left=(4, 2), target_size=(32, 48),
             negative_original_size=(64, 64), negative_crops_coords_top_left=(0, 8), negative_target_size=(16, 32)),
        (32, 32), 1,
    ),
    "no_cfg": (
        "txt2img", ["--steps", "10", "--guidance", "1"], DDIM,
        dict(prompt="a white background", num_inference_steps=10, guidance_scale=1.0),
        (32, 32), 1,
    ),
    "img2img_s06": (
        "img2img", ["--steps", "10", "--guidance", "5", "--strength", "0.6"], DDIM,
        dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=5.0,
             guidance_rescale=0.7, strength=0.6),
        (32, 32), 1,
    ),
    "inpaint_s075": (
        "inpaint", ["--steps", "10", "--guidance", "5", "--strength", "0.75"], DDIM,
        dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=5.0,
             guidance_rescale=0.7, strength=0.75),
        (32, 32), 1,
    ),
    "inpaint9_s1": (
        "inpaint9", ["--steps", "10", "--guidance", "5", "--strength", "1"], DDIM,
        dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=5.0,
             guidance_rescale=0.7, strength=1.0),
        (48, 32), 1,
    ),
}


def sdfix_prompt_args(call: dict) -> list:
    args = ["--prompt", call["prompt"]]
    if call.get("negative_prompt"):
        args += ["--negative-prompt", call["negative_prompt"]]
    return args


@torch.no_grad()
def main() -> None:
    make_model()
    generator = torch.Generator().manual_seed(SEED)
    pipes = {
        "txt2img": StableDiffusionXLPipeline.from_pretrained(MODEL),
        "img2img": StableDiffusionXLImg2ImgPipeline.from_pretrained(MODEL),
        "inpaint": StableDiffusionXLInpaintPipeline.from_pretrained(MODEL),
        "inpaint9": StableDiffusionXLInpaintPipeline.from_pretrained(INPAINT_MODEL),
    }
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    base_config = dict(pipes["txt2img"].scheduler.config)
    tensors, cases = {}, {}
    sizes = {size for (_, _, _, _, size, _) in CASES.values()}
    for (w, h) in sizes:
        pattern(w, h, seed=w * 100 + h).save(REFS / f"sdxl_init_{w}x{h}.png")
        rectangle_mask(w, h).save(REFS / f"sdxl_mask_{w}x{h}.png")
    for name, (kind, args, (scheduler_class, overrides), call, (w, h), batch) in CASES.items():
        pipe = pipes[kind]
        pipe.scheduler = scheduler_class.from_config(base_config, **overrides)
        noise = torch.randn((batch, 4, h // 2, w // 2), generator=generator)
        sdfix_args = sdfix_prompt_args(call) + args
        extra = dict(num_images_per_prompt=batch, output_type="latent")
        if kind == "txt2img":
            extra.update(latents=noise.clone(), height=h, width=w)
            sdfix_args += ["--width", str(w), "--height", str(h)]
        else:
            NEXT_NOISE[:] = [noise]
            init_path = REFS / f"sdxl_init_{w}x{h}.png"
            extra["image"] = Image.open(init_path)
            sdfix_args += ["--init-image", f"fixtures:refs/{init_path.name}", "--vae-encode", "mean"]
            if kind != "img2img":
                mask_path = REFS / f"sdxl_mask_{w}x{h}.png"
                extra.update(mask_image=Image.open(mask_path), height=h, width=w)
                sdfix_args += ["--mask", f"fixtures:refs/{mask_path.name}", "--no-paste-back"]
        if batch > 1:
            sdfix_args += ["--num-images", str(batch)]
        sdfix_args += ["--model", "fixtures:tiny-sdxl-inpaint" if kind == "inpaint9" else "fixtures:tiny-sdxl"]
        final = pipe(**call, **extra).images
        assert not NEXT_NOISE, f"{name}: the pipeline did not draw its noise"
        tensors[f"{name}.initial"] = noise
        tensors[f"{name}.final"] = final
        tensors[f"{name}.image"] = to_uint8(pipe.vae, final)
        cases[name] = sdfix_args

    # The text side alone: the concatenated penultimate states and the pooled projection.
    pipe = pipes["txt2img"]
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    tensors["encode.prompt_embeds"] = embeds
    tensors["encode.pooled"] = pooled

    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        REFS / "sdxl.safetensors",
        metadata=dict(generator="scripts/make_sdxl_refs.py", diffusers=diffusers.__version__, torch=torch.__version__),
    )
    (REFS / "sdxl.json").write_text(json.dumps(cases, indent=1) + "\n")
    print(f"wrote {len(cases)} cases")


@torch.no_grad()
def separate_vae_refs() -> None:
    """`sdfix --vae tests/fixtures/tiny-sd/vae` on the tiny SDXL: the text-to-image case's final
    latents (the VAE does not change them) decoded by diffusers with that VAE instead, into
    tests/fixtures/refs/sdxl_vae.safetensors."""
    refs = safetensors.torch.load_file(REFS / "sdxl.safetensors")
    vae = AutoencoderKL.from_pretrained(FIXTURES / "tiny-sd" / "vae")
    image = to_uint8(vae, refs["vpred_zsnr_ddim.final"])
    safetensors.torch.save_file({"vpred_zsnr_ddim.image": image.contiguous()}, REFS / "sdxl_vae.safetensors",
                                metadata=dict(generator="scripts/make_sdxl_refs.py --separate-vae"))


def finetune_refs() -> None:
    """One training step's loss and UNet gradients on the tiny SDXL, with the paper's objective
    (v-prediction on the zero-SNR schedule: `add_noise`, `get_velocity`) and the text encoders
    frozen, conditioned as diffusers' train_text_to_image_sdxl.py conditions uncropped pictures
    (`add_time_ids` = size, (0, 0), size), into tests/fixtures/refs/sdxl_finetune.safetensors."""
    from diffusers import DDPMScheduler

    pipe = StableDiffusionXLPipeline.from_pretrained(MODEL)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction", rescale_betas_zero_snr=True)
    generator = torch.Generator().manual_seed(SEED + 7)
    latents = torch.randn((2, 4, 16, 12), generator=generator)
    noise = torch.randn((2, 4, 16, 12), generator=generator)
    timesteps = torch.tensor([999, 321], dtype=torch.long)
    captions = ["a red circle", "solid black background"]
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
    time_ids = torch.tensor([[32.0, 24.0, 0.0, 0.0, 32.0, 24.0]] * 2)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = scheduler.get_velocity(latents, noise, timesteps)
    unet = pipe.unet.train()
    prediction = unet(noisy, timesteps, encoder_hidden_states=embeds,
                      added_cond_kwargs=dict(text_embeds=pooled, time_ids=time_ids)).sample
    loss = torch.nn.functional.mse_loss(prediction.float(), target.float(), reduction="mean")
    loss.backward()
    tensors = dict(latents=latents, noise=noise, timesteps=timesteps, loss=loss.detach().reshape(1))
    # The add embedding's, and a sample of the rest (the file stays small).
    kept = ("add_embedding.", "time_embedding.", "conv_in.", "conv_out.", "mid_block.attentions.0.transformer_blocks.1.")
    for name, param in unet.named_parameters():
        if name.startswith(kept):
            tensors[f"grad.{name}"] = param.grad
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, REFS / "sdxl_finetune.safetensors",
                                metadata=dict(generator="scripts/make_sdxl_refs.py --finetune", captions=json.dumps(captions)))


@torch.no_grad()
def full_size(folder: pathlib.Path) -> None:
    """The full SDXL base architecture with random weights (scripts/make_random_model.py --arch
    sdxl): 3 trailing v-prediction zero-SNR DDIM steps at 128x128, CFG 5 rescaled by 0.7, from
    stored latents, into DIR/refs.safetensors (with the 8-bit image), for
    `SDFIX_FULL_SIZE_SDXL=DIR cargo test --release --test sdxl -- --ignored`."""
    import resource
    import time

    started = time.perf_counter()
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(
        pipe.scheduler.config, prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"
    )
    initial = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(SEED))
    final = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=5.0,
                 guidance_rescale=0.7, latents=initial.clone(), height=128, width=128, output_type="latent").images
    safetensors.torch.save_file(
        {"initial": initial, "final": final.contiguous(), "image": to_uint8(pipe.vae, final).contiguous()},
        folder / "refs.safetensors",
        metadata=dict(generator="scripts/make_sdxl_refs.py --full-size", diffusers=diffusers.__version__),
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"wrote {folder / 'refs.safetensors'}: diffusers {time.perf_counter() - started:.0f} s, peak RSS {peak:.1f} GB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--separate-vae", action="store_true", help="only (re)write refs/sdxl_vae.safetensors")
    parser.add_argument("--finetune", action="store_true", help="only (re)write refs/sdxl_finetune.safetensors")
    parser.add_argument("--full-size", type=pathlib.Path, help="a random full-size SDXL folder: write its refs only")
    args = parser.parse_args()
    if args.full_size:
        full_size(args.full_size)
        raise SystemExit(0)
    if not (args.separate_vae or args.finetune):
        main()
    if not args.finetune:
        separate_vae_refs()
    if not args.separate_vae:
        finetune_refs()
