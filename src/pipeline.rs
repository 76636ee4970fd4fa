//! Text to image: run the one denoising loop from prompt embeddings ([`TextEncoder::encode`]),
//! decode. Reads no files; the caller hands it a loaded model, the sampling settings and the
//! initial latents.
//!
//! [`TextEncoder::encode`]: crate::model::stable_diffusion::TextEncoder::encode
//!
//! Matches diffusers' `StableDiffusionPipeline` with a `DDIMScheduler`: uncond and cond in one UNet
//! batch (uncond first), CFG then its rescale on the raw model output, the DDIM step, and
//! `vae.decode(latents / scaling_factor)` mapped from [-1, 1] to 8-bit with rounding.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

use crate::guidance;
use crate::model::stable_diffusion::StableDiffusion;
use crate::noise::ImageNoise;
use crate::sampler::{ddim_step, DdimParams};
use crate::schedule::Schedule;

/// How to sample, resolved and checked.
#[derive(Debug, Clone)]
pub struct SamplingSettings {
    pub schedule: Schedule,
    pub ddim: DdimParams,
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
pub struct StepInfo {
    pub index: usize,
    pub steps: usize,
    pub timestep: usize,
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

/// Runs the sampler from `latents` (b, c, h, w), f32, conditioned on `cond` (b, tokens, dim) and,
/// with CFG, `uncond` (b, tokens, dim). `noise` supplies the eta > 0 noise. Returns the final
/// latents, f32, not divided by the VAE scaling factor.
pub fn denoise(
    model: &StableDiffusion,
    latents: Tensor,
    cond: &Tensor,
    uncond: Option<&Tensor>,
    settings: &SamplingSettings,
    noise: &mut ImageNoise,
    on_step: &mut dyn FnMut(&StepInfo),
) -> Result<Tensor> {
    let schedule = &settings.schedule;
    let steps = schedule.timesteps.len();
    let (_, c, h, w) = latents.dims4()?;
    // (2b, tokens, dim): uncond first, as diffusers concatenates.
    let context = match (settings.uses_cfg(), uncond) {
        (true, Some(uncond)) => Tensor::cat(&[uncond, cond], 0)?,
        (true, None) => bail!("classifier-free guidance needs the negative prompt's embeddings"),
        (false, _) => cond.clone(),
    };
    let mut latents = latents.to_dtype(DType::F32)?;
    for (index, &timestep) in schedule.timesteps.iter().enumerate() {
        let input = latents.to_dtype(model.dtype)?;
        let input = if settings.uses_cfg() {
            Tensor::cat(&[&input, &input], 0)?
        } else {
            input
        };
        let output = model
            .unet
            .forward(&input, timestep as f64, &context)?
            .to_dtype(DType::F32)?;
        let output = if settings.uses_cfg() {
            let parts = output.chunk(2, 0)?;
            let guided = guidance::cfg(&parts[0], &parts[1], settings.guidance)?;
            guidance::rescale(&guided, &parts[1], settings.guidance_rescale)?
        } else {
            output
        };
        let step_noise = if settings.ddim.eta > 0.0 {
            Some(noise.sample((c, h, w), latents.device())?)
        } else {
            None
        };
        latents = ddim_step(schedule, index, &latents, &output, &settings.ddim, step_noise.as_ref())?;
        on_step(&StepInfo { index, steps, timestep });
    }
    ensure_finite(&latents, "UNet", model.dtype)?;
    Ok(latents)
}

/// Decodes final latents to 8-bit RGB images, (b, 3, H, W) u8, as diffusers'
/// `(image / 2 + 0.5).clamp(0, 1) * 255`, rounded.
pub fn decode(model: &StableDiffusion, latents: &Tensor) -> Result<Tensor> {
    let images = model
        .vae
        .decode(&latents.to_dtype(model.vae_dtype)?)?
        .to_dtype(DType::F32)?;
    ensure_finite(&images, "VAE", model.vae_dtype)?;
    let scaled = ((images * 0.5)? + 0.5)?.clamp(0f32, 1f32)?;
    Ok((scaled * 255.0)?.round()?.to_dtype(DType::U8)?)
}
