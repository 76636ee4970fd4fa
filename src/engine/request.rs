//! A request (what one prompt asks for, as a user says it) and its resolution into a [`Job`]
//! (everything needed to make its images), with every check on user input done here, once,
//! before any weight is read: prediction type against zero terminal SNR, guidance, eta, steps,
//! image sizes against the VAE factor and the UNet's depth, initial latents against all of them.

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::settings::{ImageSettings, LoraSetting, SchedulerRecord};
use crate::config::scheduler::SchedulerConfig;
use crate::pipeline::SamplingSettings;
use crate::sampling::ddim::DdimParams;
use crate::sampling::{Prediction, Sampler};
use crate::schedule::{BetaSource, Schedule, ScheduleSpec, SigmaSchedule, TerminalAlphaBar, TimestepSpacing};
use crate::weights::loader::ModelConfigs;

/// Sampling steps unless told otherwise.
pub const DEFAULT_STEPS: usize = 50;
/// Classifier-free guidance scale unless told otherwise (diffusers' pipeline default).
pub const DEFAULT_GUIDANCE: f64 = 7.5;
/// The paper's recommended CFG rescale phi (Section 3.4).
pub const DEFAULT_GUIDANCE_RESCALE: f64 = 0.7;
/// The timestep spacing sdfix uses unless told otherwise: the paper's fix (Table 2).
pub const DEFAULT_SPACING: TimestepSpacing = TimestepSpacing::Trailing;

/// What one prompt asks for. `None` fields take the model's value (its scheduler config, its
/// UNet's sample size) or, for `num_images`, 1 (or the batch of `latents`).
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: String,
    /// What to steer away from (the unconditional branch of CFG).
    pub negative_prompt: String,
    /// The seed of image 0; image k uses seed + k.
    pub seed: u64,
    pub num_images: Option<usize>,
    pub steps: usize,
    /// CFG scale w; at or below 1 the UNet runs on the prompt alone.
    pub guidance: f64,
    /// phi of the CFG rescale, 0..1 (0 = off).
    pub guidance_rescale: f64,
    pub spacing: TimestepSpacing,
    /// The zero terminal SNR rescale (Algorithm 1) [default: the scheduler config's].
    pub zero_snr: Option<bool>,
    /// What the model predicts [default: the scheduler config's `prediction_type`].
    pub prediction: Option<Prediction>,
    /// Offset added to every `leading` timestep [default: the scheduler config's].
    pub steps_offset: Option<usize>,
    /// DDIM eta: 0 is deterministic.
    pub eta: f64,
    /// Which sampler walks the schedule (default DDIM, the paper's).
    pub sampler: Sampler,
    /// alpha_bar_T under zero terminal SNR: 0 (exact) or another tool's clamp.
    pub terminal_alpha_bar: TerminalAlphaBar,
    /// Where the steps sit on the noise scale: the timesteps' own, or a Karras / exponential ramp.
    pub sigmas: SigmaSchedule,
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// Initial latents instead of seeded noise: (B, C, H, W) f32 on the CPU, one row per image.
    pub latents: Option<Tensor>,
}

impl Request {
    /// A request for `prompt` with sdfix's defaults: the paper's fixes on, 50 steps, CFG 7.5.
    pub fn new(prompt: &str) -> Self {
        Self {
            prompt: prompt.to_string(),
            negative_prompt: String::new(),
            seed: 0,
            num_images: None,
            steps: DEFAULT_STEPS,
            guidance: DEFAULT_GUIDANCE,
            guidance_rescale: DEFAULT_GUIDANCE_RESCALE,
            spacing: DEFAULT_SPACING,
            zero_snr: None,
            prediction: None,
            steps_offset: None,
            eta: 0.0,
            sampler: Sampler::Ddim,
            terminal_alpha_bar: TerminalAlphaBar::Exact,
            sigmas: SigmaSchedule::Schedule,
            width: None,
            height: None,
            latents: None,
        }
    }

    /// The original, flawed pipeline, for side-by-side runs: leading timesteps, no zero-SNR
    /// rescale, no CFG rescale (`generate --baseline`, `ablate`'s first column).
    pub fn into_baseline(mut self) -> Self {
        self.spacing = TimestepSpacing::Leading;
        self.zero_snr = Some(false);
        self.guidance_rescale = 0.0;
        self
    }
}

/// One request, resolved and checked: everything to make its images.
#[derive(Debug, Clone)]
pub struct Job {
    pub request: Request,
    pub settings: SamplingSettings,
    pub zero_snr: bool,
    pub steps_offset: usize,
    /// (channels, height, width) of one image's latents.
    pub latent_shape: (usize, usize, usize),
    /// The seed of every image of the request, by image index.
    pub seeds: Vec<u64>,
    /// The image indices still to make (all of them unless [`Job::keep_images`] dropped some).
    pub images: Vec<usize>,
    /// Things the user should know that are not errors (a config asking for what cannot work).
    pub warnings: Vec<String>,
}

impl Job {
    /// Keeps only the images whose index `keep` accepts (e.g. those not yet on disk).
    pub fn keep_images(&mut self, keep: impl Fn(usize) -> bool) {
        self.images.retain(|&k| keep(k));
    }
}

/// Zero SNR and prediction type, with the one combination that cannot work caught; a config
/// that asks for it gets a warning and the rescale off, a flag that asks for it an error.
fn resolve_prediction(
    request: &Request,
    config: &SchedulerConfig,
    config_path: &str,
    warnings: &mut Vec<String>,
) -> Result<(Prediction, bool)> {
    let prediction = match request.prediction {
        Some(p) => p,
        None => config
            .prediction_type
            .parse()
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("{config_path}: bad prediction_type (override with --prediction)"))?,
    };
    let zero_snr = request.zero_snr.unwrap_or(config.rescale_betas_zero_snr);
    if zero_snr && prediction == Prediction::Epsilon {
        if request.zero_snr == Some(true) {
            bail!(
                "--zero-snr needs a v_prediction (or sample) model: with epsilon the first step divides by \
                 sqrt(alpha_bar_T) = 0; pass --no-zero-snr or --prediction v_prediction"
            );
        }
        warnings.push(format!(
            "warning: {config_path} asks for zero terminal SNR but the prediction type is epsilon, which cannot \
             sample from it; using --no-zero-snr"
        ));
        return Ok((prediction, false));
    }
    Ok((prediction, zero_snr))
}

/// Checks initial latents read from a file: (C, H, W) or (B, C, H, W) with the UNet's channels;
/// returns them as (B, C, H, W) f32 on the CPU. `what` names their source in errors.
pub fn check_latents(latents: Tensor, channels: usize, what: &str) -> Result<Tensor> {
    let latents = match latents.rank() {
        3 => latents.unsqueeze(0)?,
        4 => latents,
        rank => bail!("{what}: \"latents\" has {rank} dims; expected [C, H, W] or [B, C, H, W]"),
    };
    let found = latents.dim(1)?;
    ensure!(
        found == channels,
        "{what}: {found} channels, but the UNet takes {channels}"
    );
    Ok(latents.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
}

/// Width and height in latent pixels, checked against the VAE factor and the UNet's depth.
fn latent_size(configs: &ModelConfigs, request: &Request) -> Result<(usize, usize)> {
    let factor = configs.vae.downscale_factor();
    let multiple = factor << configs.unet.downsamples();
    if let Some(latents) = &request.latents {
        let (_, _, h, w) = latents.dims4()?;
        for (flag, given, derived) in [
            ("--height", request.height, h * factor),
            ("--width", request.width, w * factor),
        ] {
            ensure!(
                given.is_none_or(|g| g == derived),
                "{flag} {} disagrees with --latents ({derived} px)",
                given.unwrap_or(0)
            );
        }
        ensure!(
            (h * factor).is_multiple_of(multiple) && (w * factor).is_multiple_of(multiple),
            "--latents: {h}x{w} latents are not multiples of {}",
            multiple / factor
        );
        return Ok((h, w));
    }
    let default = configs.unet.sample_size.map(|s| s * factor);
    let size = |flag: &str, value: Option<usize>| -> Result<usize> {
        let value = value
            .or(default)
            .with_context(|| format!("{flag} is required: the UNet config has no sample_size"))?;
        ensure!(
            value > 0 && value.is_multiple_of(multiple),
            "{flag} {value} must be a positive multiple of {multiple} (the VAE factor {factor} x 2^{} UNet downsamplings)",
            configs.unet.downsamples()
        );
        Ok(value / factor)
    };
    Ok((size("--height", request.height)?, size("--width", request.width)?))
}

/// Resolves one request into a job; every error is about this request's settings.
/// What replaces a zero-SNR alpha_bar_T = 0 when a Karras or exponential ramp needs a finite
/// sigma_max and the user asked for `exact`: ComfyUI's and AUTOMATIC1111's value, the tools whose
/// users pick these ramps (with a warning that says so).
const RAMP_TERMINAL_ALPHA_BAR: TerminalAlphaBar = TerminalAlphaBar::Comfy;

pub(super) fn resolve(configs: &ModelConfigs, mut request: Request) -> Result<Job> {
    let scheduler = &configs.scheduler;
    let mut warnings = Vec::new();
    let (prediction, zero_snr) = resolve_prediction(&request, scheduler, &configs.scheduler_path, &mut warnings)?;
    ensure!(
        request.guidance >= 0.0,
        "--guidance {} must not be negative",
        request.guidance
    );
    ensure!(
        (0.0..=1.0).contains(&request.guidance_rescale),
        "--guidance-rescale {} must be within 0..1",
        request.guidance_rescale
    );
    ensure!(request.eta >= 0.0, "--eta {} must not be negative", request.eta);
    ensure!(
        request.eta == 0.0 || request.sampler == Sampler::Ddim,
        "--eta is DDIM's; with --sampler {} drop --eta (for fresh noise at each step use --sampler euler_a or dpmpp_2m_sde)",
        request.sampler
    );
    if request.sigmas != SigmaSchedule::Schedule && zero_snr && request.terminal_alpha_bar == TerminalAlphaBar::Exact {
        warnings.push(format!(
            "warning: --sigmas {} needs a finite sigma_max, which zero terminal SNR does not have; using \
             --terminal-alpha-bar {RAMP_TERMINAL_ALPHA_BAR} (pass --terminal-alpha-bar diffusers for diffusers' value)",
            request.sigmas
        ));
        request.terminal_alpha_bar = RAMP_TERMINAL_ALPHA_BAR;
    }
    let betas = scheduler.beta_source()?;
    let train_timesteps = betas.train_timesteps();
    let steps = request.steps;
    ensure!(
        (1..=train_timesteps).contains(&steps),
        "--steps {steps} must be between 1 and the model's {train_timesteps} training timesteps"
    );
    let spacing = request.spacing;
    let steps_offset = request.steps_offset.unwrap_or(scheduler.steps_offset);
    let spec = ScheduleSpec {
        betas,
        zero_terminal_snr: zero_snr,
        spacing,
        steps,
        steps_offset,
        set_alpha_to_one: scheduler.set_alpha_to_one,
    };
    let schedule = Schedule::new(&spec)
        .with_context(|| format!("--steps {steps} with --spacing {spacing}"))?
        .with_terminal_alpha_bar(request.terminal_alpha_bar)
        .with_sigmas(request.sigmas)?;
    let settings = SamplingSettings {
        schedule,
        sampler: request.sampler,
        ddim: DdimParams {
            prediction,
            eta: request.eta,
            clip_sample_range: scheduler.clip_sample.then_some(scheduler.clip_sample_range),
        },
        guidance: request.guidance,
        guidance_rescale: request.guidance_rescale,
    };
    let (h, w) = latent_size(configs, &request)?;
    let num_images = match (&request.latents, request.num_images) {
        (Some(latents), Some(n)) if n != latents.dim(0)? => {
            bail!(
                "--num-images {n} disagrees with --latents, which holds {} images",
                latents.dim(0)?
            )
        }
        (Some(latents), _) => latents.dim(0)?,
        (None, n) => n.unwrap_or(1),
    };
    ensure!(num_images > 0, "--num-images must be at least 1");
    let seeds: Vec<u64> = (0..num_images as u64).map(|k| request.seed.wrapping_add(k)).collect();
    Ok(Job {
        request,
        settings,
        zero_snr,
        steps_offset,
        latent_shape: (configs.unet.in_channels, h, w),
        images: (0..seeds.len()).collect(),
        seeds,
        warnings,
    })
}

/// What the engine records in image `k` of `job`.
pub(super) struct RecordContext<'a> {
    pub configs: &'a ModelConfigs,
    pub model: &'a str,
    pub revision: Option<&'a str>,
    pub model_hash: Option<&'a str>,
    pub loras: Vec<crate::weights::lora::LoraRecord>,
    pub dtype: &'a str,
    pub device: &'a str,
}

impl RecordContext<'_> {
    pub fn image_settings(&self, job: &Job, k: usize) -> ImageSettings {
        let (_, h, w) = job.latent_shape;
        let factor = self.configs.vae.downscale_factor();
        let scheduler = &self.configs.scheduler;
        let (beta_schedule, beta_start, beta_end, trained) = match scheduler.beta_source() {
            Ok(BetaSource::Named {
                schedule,
                beta_start,
                beta_end,
                ..
            }) => (schedule.name().to_string(), beta_start, beta_end, false),
            _ => ("trained_betas".to_string(), 0.0, 0.0, true),
        };
        ImageSettings {
            version: format!("sdfix {}", env!("CARGO_PKG_VERSION")),
            model: self.model.to_string(),
            revision: self.revision.map(str::to_string),
            model_hash: self.model_hash.map(str::to_string),
            loras: self
                .loras
                .iter()
                .map(|l| LoraSetting {
                    name: l.name.clone(),
                    hash: l.hash.clone(),
                    weight: l.weight,
                })
                .collect(),
            prompt: job.request.prompt.clone(),
            negative_prompt: job.request.negative_prompt.clone(),
            seed: job.seeds[k],
            steps: job.request.steps,
            guidance: job.settings.guidance,
            guidance_rescale: job.settings.guidance_rescale,
            spacing: job.request.spacing.to_string(),
            zero_snr: job.zero_snr,
            prediction: job.settings.ddim.prediction.name().to_string(),
            eta: job.settings.ddim.eta,
            sampler: job.settings.sampler.name().to_string(),
            terminal_alpha_bar: job.request.terminal_alpha_bar.name().to_string(),
            sigmas: job.request.sigmas.name().to_string(),
            width: w * factor,
            height: h * factor,
            dtype: self.dtype.to_string(),
            device: self.device.to_string(),
            from_latents_file: job.request.latents.is_some(),
            scheduler: SchedulerRecord {
                beta_schedule,
                beta_start,
                beta_end,
                num_train_timesteps: scheduler.num_train_timesteps,
                trained_betas: trained,
                steps_offset: job.steps_offset,
                set_alpha_to_one: scheduler.set_alpha_to_one,
                clip_sample: scheduler.clip_sample,
                timesteps: job.settings.schedule.timesteps.clone(),
            },
        }
    }
}
