//! One batch: the one denoising loop from prompt embeddings ([`TextEncoder::encode`]), then the
//! decode. Reads and writes no files; the engine hands it a loaded model, the sampling settings
//! and the initial latents (noise, or for img2img the init latents noised to the first step's
//! level), and for inpainting the mask and init latents ([`Inpainting`]). A per-step hook sees the step
//! index, the timestep, the latents and the x0 estimate (as diffusers' `callback_on_step_end`);
//! an error from it stops the loop at that step.
//!
//! [`TextEncoder::encode`]: crate::model::stable_diffusion::TextEncoder::encode
//!
//! Matches diffusers' `StableDiffusionPipeline` with a `DDIMScheduler` (or the scheduler of the
//! chosen `--sampler`): uncond and cond in one UNet batch (uncond first; two passes when their
//! token counts differ, as A1111), CFG then its rescale on
//! the raw model output, the sampler's step, and `vae.decode(latents / scaling_factor)` mapped
//! from [-1, 1] to 8-bit with rounding. The latents stay in the variance-preserving form
//! x_t = sqrt(a) x0 + sqrt(1 - a) eps for every sampler, so the UNet's input is the latents
//! themselves (diffusers' Euler-type schedulers keep x / sqrt(a) and divide by
//! sqrt(sigma^2 + 1) in `scale_model_input`: the same input).

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

use crate::model::stable_diffusion::StableDiffusion;
use crate::model::unet::{Conditioning, CrossAttentionCache};
use crate::sampling::guidance;
use crate::sampling::noise::ImageNoise;
use crate::sampling::sampler::{self, Sampler};
use crate::sampling::step::{MultistepState, StepInput, StepOutput, StepParams};
use crate::schedule::Schedule;

/// How to sample, resolved and checked.
#[derive(Debug, Clone)]
pub struct SamplingSettings {
    pub schedule: Schedule,
    pub sampler: Sampler,
    /// The prediction type, and DDIM's eta and x0 clipping (used by `Sampler::Ddim` only).
    pub step: StepParams,
    /// Classifier-free guidance scale w; at or below 1 the UNet runs on the prompt alone.
    pub guidance: f64,
    /// phi of the CFG rescale (0 = off).
    pub guidance_rescale: f64,
}

impl SamplingSettings {
    /// Whether the UNet also runs on the negative prompt.
    pub fn uses_cfg(&self) -> bool {
        self.guidance > 1.0
    }
}

/// What the loop reports after each step.
#[derive(Debug, Clone, Copy)]
pub struct StepInfo<'a> {
    /// 0-based step index, of `steps`.
    pub index: usize,
    pub steps: usize,
    pub timestep: usize,
    /// The latents after this step, (b, c, h, w) f32.
    pub latents: &'a Tensor,
    /// The clean-sample estimate x0 made at this step, (b, c, h, w) f32.
    pub x0: &'a Tensor,
}

/// Fails with a hint when a tensor holds NaN or infinity (f16 overflow, usually).
fn ensure_finite(xs: &Tensor, stage: &str, dtype: DType) -> Result<()> {
    let finite = xs
        .to_dtype(DType::F32)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?
        .is_finite();
    if !finite {
        bail!("the {stage} produced NaN or infinite values in {dtype:?}; rerun with --dtype f32 or --dtype bf16");
    }
    Ok(())
}

/// How a batch inpaints (diffusers' `StableDiffusionInpaintPipeline`).
#[derive(Debug, Clone, Copy)]
pub enum Inpainting<'a> {
    /// An ordinary UNet: after each step the kept region (mask 0) becomes the init latents noised
    /// to the next step's level, and after the last step the init latents themselves.
    Blend {
        /// The init picture's latents, (b, c, h, w) f32.
        image_latents: &'a Tensor,
        /// 1 repaints, 0 keeps, (b, 1, h, w) f32.
        mask: &'a Tensor,
        /// The noise the init latents are noised with (the batch's initial noise), (b, c, h, w).
        noise: &'a Tensor,
    },
    /// An inpainting UNet (in_channels = 2 c + 1): the mask and the masked picture's latents go
    /// in beside the latents at every step.
    Condition {
        /// (b, 1, h, w) f32.
        mask: &'a Tensor,
        /// (b, c, h, w) f32.
        masked_image_latents: &'a Tensor,
    },
}

impl Inpainting<'_> {
    /// The UNet's input for `latents`: the extra channels of an inpainting UNet appended.
    fn unet_input(&self, latents: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Blend { .. } => latents.clone(),
            Self::Condition {
                mask,
                masked_image_latents,
            } => {
                // (b, c + 1 + c, h, w), in diffusers' order.
                let dtype = latents.dtype();
                Tensor::cat(
                    &[latents, &mask.to_dtype(dtype)?, &masked_image_latents.to_dtype(dtype)?],
                    1,
                )?
            }
        })
    }

    /// The latents after step `index` of `schedule`, the kept region put back (Blend only).
    fn after_step(&self, latents: Tensor, schedule: &Schedule, index: usize) -> Result<Tensor> {
        let Self::Blend {
            image_latents,
            mask,
            noise,
        } = self
        else {
            return Ok(latents);
        };
        let kept = if index + 1 < schedule.timesteps.len() {
            // diffusers' `add_noise(image_latents, noise, timesteps[i + 1])`.
            let a = schedule.alpha_cumprod(index + 1);
            ((*image_latents * a.sqrt())? + (*noise * (1.0 - a).sqrt())?)?
        } else {
            (*image_latents).clone()
        };
        // (1 - m) kept + m latents
        let keep = mask.affine(-1.0, 1.0)?;
        Ok((kept.broadcast_mul(&keep)? + latents.broadcast_mul(mask)?)?)
    }
}

/// What one batch starts from.
pub struct BatchInput<'a> {
    /// The initial latents, (b, c, h, w).
    pub latents: Tensor,
    /// The prompts' conditioning, one per image (batch 1 each): embeddings (1, tokens, dim) and
    /// for SDXL the pooled embedding and time ids. Prompts of different lengths (77 tokens per
    /// chunk) may share a batch: see [`UnetPasses`].
    pub cond: &'a [Conditioning],
    /// The negative prompts', one per image; needed with CFG.
    pub uncond: Option<&'a [Conditioning]>,
    pub settings: &'a SamplingSettings,
    /// Inpainting's mask and init latents.
    pub inpainting: Option<Inpainting<'a>>,
    /// Decode in tiles ([`crate::model::vae::Vae::decode_tiled`]).
    pub vae_tiling: bool,
}

/// Runs the sampler from `input.latents`, conditioned on `input.cond` and, with CFG,
/// `input.uncond`. `noise` supplies DDIM's eta > 0 noise and the stochastic samplers' per-step
/// noise. Returns the final latents, f32, not divided by the VAE scaling factor.
pub fn denoise(
    model: &StableDiffusion,
    input: BatchInput,
    noise: &mut ImageNoise,
    on_step: &mut dyn FnMut(&StepInfo) -> Result<()>,
) -> Result<Tensor> {
    let BatchInput {
        latents,
        cond,
        uncond,
        settings,
        inpainting,
        vae_tiling: _,
    } = input;
    let schedule = &settings.schedule;
    let steps = schedule.timesteps.len();
    let (_, c, h, w) = latents.dims4()?;
    // The (2b)-row batch's conditioning: uncond first, as diffusers concatenates (SDXL's added
    // conditioning too).
    let rows: Vec<&Conditioning> = match (settings.uses_cfg(), uncond) {
        (true, Some(uncond)) => uncond.iter().chain(cond).collect(),
        (true, None) => bail!("classifier-free guidance needs the negative prompt's embeddings"),
        (false, _) => cond.iter().collect(),
    };
    let mut passes = UnetPasses::new(&rows)?;
    let mut latents = latents.to_dtype(DType::F32)?;
    let mut history = MultistepState::default();
    for (index, &timestep) in schedule.timesteps.iter().enumerate() {
        let input = latents.to_dtype(model.dtype)?;
        let input = match &inpainting {
            Some(inpainting) => inpainting.unet_input(&input)?,
            None => input,
        };
        let input = if settings.uses_cfg() {
            Tensor::cat(&[&input, &input], 0)?
        } else {
            input
        };
        let output = passes
            .forward(model, &input, schedule.model_timestep(index))?
            .to_dtype(DType::F32)?;
        let step_noise = if settings.sampler.is_stochastic() {
            Some(noise.sample_step((c, h, w), latents.device())?)
        } else if settings.sampler == Sampler::Ddim && settings.step.eta > 0.0 {
            Some(noise.sample((c, h, w), latents.device())?)
        } else {
            None
        };
        let step = sampler_step(settings, index, &latents, &output, &mut history, step_noise.as_ref())?;
        latents = match &inpainting {
            Some(inpainting) => inpainting.after_step(step.prev_sample, schedule, index)?,
            None => step.prev_sample,
        };
        // An error from the hook (the engine's interrupt) stops the loop at this step.
        on_step(&StepInfo {
            index,
            steps,
            timestep,
            latents: &latents,
            x0: &step.pred_original_sample,
        })?;
    }
    Ok(latents)
}

/// The UNet calls of one step. Rows whose contexts have the same number of tokens share a call;
/// with CFG, a prompt and a negative prompt of different chunk counts are therefore two UNet
/// passes, which is A1111's default (`CFGDenoiser.forward` without "Pad prompt/negative
/// prompt" runs cond and uncond apart when their shapes differ), and the CFG math after is
/// unchanged. Prompts of one length, the common case, stay one batched call as in diffusers.
/// (A1111 instead pads the prompts of a batch to the longest with their last token's vector,
/// `stack_conds`; sdfix keeps every image what it is alone, at any batch size.)
struct UnetPasses {
    passes: Vec<UnetPass>,
    /// With more than one pass: where each row of the batch is in the passes' outputs, joined.
    order: Option<Tensor>,
}

struct UnetPass {
    /// The batch rows it takes, in order; `None` for all of them (the only pass).
    rows: Option<Tensor>,
    context: Conditioning,
    /// The context's cross-attention keys and values, made at the first step, reused after.
    cache: CrossAttentionCache,
}

impl UnetPasses {
    fn new(rows: &[&Conditioning]) -> Result<Self> {
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        for (r, row) in rows.iter().enumerate() {
            let tokens = row.tokens()?;
            match groups.iter_mut().find(|(t, _)| *t == tokens) {
                Some((_, members)) => members.push(r),
                None => groups.push((tokens, vec![r])),
            }
        }
        let single = groups.len() == 1;
        let mut passes = Vec::with_capacity(groups.len());
        let mut joined: Vec<usize> = Vec::with_capacity(rows.len());
        for (_, members) in &groups {
            let parts: Vec<&Conditioning> = members.iter().map(|&r| rows[r]).collect();
            let context = Conditioning::cat(&parts)?;
            let indices: Vec<u32> = members.iter().map(|&r| r as u32).collect();
            let device = context.context.device().clone();
            passes.push(UnetPass {
                rows: (!single)
                    .then(|| Tensor::from_vec(indices, members.len(), &device))
                    .transpose()?,
                context,
                cache: CrossAttentionCache::new(),
            });
            joined.extend(members.iter().copied());
        }
        let order = if single {
            None
        } else {
            // Row r's position among the joined outputs.
            let mut position = vec![0u32; rows.len()];
            for (p, &r) in joined.iter().enumerate() {
                position[r] = p as u32;
            }
            let device = passes[0].context.context.device().clone();
            Some(Tensor::from_vec(position, rows.len(), &device)?)
        };
        Ok(Self { passes, order })
    }

    /// The UNet's output for every row of `input` at `timestep`, in row order.
    fn forward(&mut self, model: &StableDiffusion, input: &Tensor, timestep: f64) -> Result<Tensor> {
        let mut outputs = Vec::with_capacity(self.passes.len());
        for pass in &mut self.passes {
            let rows = match &pass.rows {
                Some(rows) => input.index_select(rows, 0)?,
                None => input.clone(),
            };
            outputs.push(
                model
                    .unet()?
                    .forward_cached(&rows, timestep, &pass.context, &mut pass.cache)?,
            );
        }
        Ok(match &self.order {
            Some(order) => Tensor::cat(&outputs, 0)?.index_select(order, 0)?,
            None => outputs.remove(0),
        })
    }
}

/// Everything a step does after the UNet: CFG and its rescale on the raw output (with CFG the
/// output is the (2b, ...) uncond-then-cond batch), then the sampler's step. `history` carries the
/// multistep samplers' previous x0; `noise` is the step's noise, where the sampler takes one.
pub fn sampler_step(
    settings: &SamplingSettings,
    index: usize,
    latents: &Tensor,
    unet_output: &Tensor,
    history: &mut MultistepState,
    noise: Option<&Tensor>,
) -> Result<StepOutput> {
    let guided = if settings.uses_cfg() {
        let parts = unet_output.chunk(2, 0)?;
        let guided = guidance::cfg(&parts[0], &parts[1], settings.guidance)?;
        guidance::rescale(&guided, &parts[1], settings.guidance_rescale)?
    } else {
        unet_output.clone()
    };
    let input = StepInput {
        schedule: &settings.schedule,
        index,
        sample: latents,
        model_output: &guided,
    };
    Ok(sampler::step(settings.sampler, &input, &settings.step, history, noise)?)
}

/// Decodes final latents to images in [-1, 1], (b, 3, H, W) f32; in tiles with `tiled`, as
/// diffusers after `vae.enable_tiling()`.
pub fn decode(model: &StableDiffusion, latents: &Tensor, tiled: bool) -> Result<Tensor> {
    let latents = latents.to_dtype(model.vae_dtype)?;
    let images = if tiled {
        model.vae.decode_tiled(&latents)?
    } else {
        model.vae.decode(&latents)?
    };
    Ok(images.to_dtype(DType::F32)?)
}

/// Images in [-1, 1] to 8-bit, (b, 3, H, W) u8, as diffusers' `(image / 2 + 0.5).clamp(0, 1) * 255`,
/// rounded.
pub fn to_u8(images: &Tensor) -> Result<Tensor> {
    let scaled = ((images * 0.5)? + 0.5)?.clamp(0f32, 1f32)?;
    Ok((scaled * 255.0)?.round()?.to_dtype(DType::U8)?)
}

/// One batch end to end: [`denoise`], then [`decode`] to 8-bit RGB buffers, failing with a hint
/// when either stage produced NaN or infinity. Returns the final latents, f32, and one row-major
/// RGB buffer per image.
pub fn denoise_and_decode(
    model: &StableDiffusion,
    input: BatchInput,
    noise: &mut ImageNoise,
    on_step: &mut dyn FnMut(&StepInfo) -> Result<()>,
) -> Result<(Tensor, Vec<Vec<u8>>)> {
    let tiled = input.vae_tiling;
    let final_latents = denoise(model, input, noise, on_step)?;
    ensure_finite(&final_latents, "UNet", model.dtype)?;
    let images = decode(model, &final_latents, tiled)?;
    ensure_finite(&images, "VAE", model.vae_dtype)?;
    let rgb = to_rgb(&to_u8(&images)?)?;
    Ok((final_latents, rgb))
}

/// (b, 3, H, W) u8 -> one row-major RGB buffer per image.
pub fn to_rgb(images: &Tensor) -> Result<Vec<Vec<u8>>> {
    let images = images.permute((0, 2, 3, 1))?.contiguous()?;
    (0..images.dim(0)?)
        .map(|i| Ok(images.get(i)?.flatten_all()?.to_vec1::<u8>()?))
        .collect()
}
