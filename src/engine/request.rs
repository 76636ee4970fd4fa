//! A request (what one prompt asks for, as a user says it) and its resolution into a [`Job`]
//! (everything needed to make its images), with every check on user input done here, once,
//! before any weight is read: prediction type against zero terminal SNR, guidance, eta, steps,
//! image sizes against the VAE factor, initial latents against all of them, and img2img's
//! picture, strength and mask (resized here to the size to make, once per request).

use std::sync::Arc;

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device, Tensor};

use super::field::{Field, RequestError, Warning};
use super::hires::{self, HiresFix, ResolvedHires};
use super::init_image::{self, InitImage, MaskImage, ResizeMode, VaeEncodeMode};
use super::micro::{MicroConditioning, PixelSize};
use crate::config::scheduler::SchedulerConfig;
use crate::model::stable_diffusion::PromptOptions;
use crate::model::vae_tiling::VaeTiling;
use crate::pipeline::SamplingSettings;
use crate::prompt::Emphasis;
use crate::sampling::step::StepParams;
use crate::sampling::{Prediction, Sampler};
use crate::schedule::{Schedule, ScheduleSpec, SigmaRange, SigmaSchedule, TerminalAlphaBar, TimestepSpacing};
use crate::weights::loader::ModelConfigs;
use crate::weights::lora::Loras;

/// Sampling steps unless told otherwise.
pub const DEFAULT_STEPS: usize = 50;
/// Classifier-free guidance scale unless told otherwise (diffusers' pipeline default).
pub const DEFAULT_GUIDANCE: f64 = 7.5;
/// The paper's recommended CFG rescale phi (Section 3.4).
pub const DEFAULT_GUIDANCE_RESCALE: f64 = 0.7;
/// The timestep spacing sdfix uses unless told otherwise: the paper's fix (Table 2).
pub const DEFAULT_SPACING: TimestepSpacing = TimestepSpacing::Trailing;
/// img2img's strength unless told otherwise (diffusers' and AUTOMATIC1111's default).
pub const DEFAULT_STRENGTH: f64 = 0.75;
/// A1111's "Clip skip" unless told otherwise: the last layer.
pub const DEFAULT_CLIP_SKIP: usize = 1;
/// The paste-back's mask blur in px unless told otherwise (AUTOMATIC1111's default).
pub const DEFAULT_MASK_BLUR: f64 = 4.0;

/// What one prompt asks for: the one settings type of sdfix, everything a picture depends on
/// besides the model. Every front end builds one (the command line's flags, then a prompt-file
/// line's, an API body's or a PNG's [`Overrides`](super::Overrides) applied onto it), and the
/// engine checks it once (`resolve`, through [`Engine::job`](super::Engine::job)). `None` fields take the model's value (its scheduler
/// config, its UNet's sample size) or, for `num_images`, 1 (or the batch of `latents`).
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
    /// Where a ramp of `sigmas` ends: the model's whole range (k-diffusion, A1111, ComfyUI) or
    /// the spaced timesteps' (diffusers' Euler).
    pub sigma_range: SigmaRange,
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// Initial latents instead of seeded noise: (B, C, H, W) f32 on the CPU, one row per image.
    /// With an init image, the noise added to its latents.
    pub latents: Option<Tensor>,
    /// img2img: the picture to start from (text to image without one).
    pub init_image: Option<Arc<InitImage>>,
    /// How much of the schedule img2img runs, 0 < S <= 1 [default: [`DEFAULT_STRENGTH`]]: it
    /// starts at step n - int(n S) (diffusers' rule); S = 1 under zero SNR starts from pure noise.
    pub strength: Option<f64>,
    /// Inpainting: white repaints, black keeps.
    pub mask: Option<Arc<MaskImage>>,
    /// The paste-back's Gaussian blur of the mask, in px [default: [`DEFAULT_MASK_BLUR`]].
    pub mask_blur: Option<f64>,
    /// Inpainting: put the kept pixels back after decoding, so they are byte-exact.
    pub paste_back: bool,
    /// How the init picture and the mask are fitted to the size to make.
    pub resize: ResizeMode,
    /// The init picture's latents: a sample of the VAE's Gaussian, or its mean.
    pub vae_encode: VaeEncodeMode,
    /// The LoRAs merged into the model for this request, instead of the engine's own (`--lora`);
    /// `None` uses the engine's. Open them with [`crate::engine::Engine::open_loras`].
    pub loras: Option<Arc<Loras>>,
    /// SDXL's micro-conditioning (sizes and crop the UNet is told about).
    pub micro: MicroConditioning,
    /// SDXL: encode an empty negative prompt instead of zeroing its embeddings (what diffusers
    /// does with `force_zeros_for_empty_prompt` in the model's config and no negative prompt).
    pub encode_empty_negative: bool,
    /// How prompt weights act on the text encoder's output (`--emphasis`, A1111's default
    /// `original`).
    pub emphasis: Emphasis,
    /// A1111's "Clip skip", 1 = the last layer (`--clip-skip`; what it does per family:
    /// [`crate::model::stable_diffusion::TextEncoder::encode_prompt`]).
    pub clip_skip: usize,
    /// A prompt and negative prompt of different chunk counts: pad the shorter with empty
    /// chunks into one UNet batch (A1111's "Pad prompt/negative prompt") instead of running
    /// the two as separate UNet passes (A1111's default).
    pub pad_conds: bool,
    /// Decode (and, for img2img, encode) in overlapping tiles, as diffusers'
    /// `vae.enable_tiling()` ([`crate::model::vae_tiling`]): memory bounded by a tile whatever
    /// the size, at the cost of slight tile-sized changes in the picture.
    pub vae_tiling: bool,
    /// A second pass at a larger size (A1111's txt2img hires fix); off unless a scale or size is
    /// set.
    pub hires: HiresFix,
    /// The hires pass's noise instead of seeded noise: (B, C, H, W) f32 on the CPU at the hires
    /// latent size, one row per image (to reproduce another tool's noise exactly).
    pub hires_latents: Option<Tensor>,
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
            sigma_range: SigmaRange::Model,
            width: None,
            height: None,
            latents: None,
            init_image: None,
            strength: None,
            mask: None,
            mask_blur: None,
            paste_back: true,
            resize: ResizeMode::default(),
            vae_encode: VaeEncodeMode::default(),
            loras: None,
            micro: MicroConditioning::default(),
            encode_empty_negative: false,
            emphasis: Emphasis::Original,
            clip_skip: DEFAULT_CLIP_SKIP,
            pad_conds: false,
            vae_tiling: false,
            hires: HiresFix::default(),
            hires_latents: None,
        }
    }

    /// How the text encoder reads this request's prompts.
    pub fn prompt_options(&self) -> PromptOptions {
        PromptOptions {
            emphasis: self.emphasis,
            clip_skip: self.clip_skip,
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

/// How a batch starts and what its UNet takes besides the latents: one per batch, since each
/// builds the batch's inputs differently (the engine's `execute`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BatchMode {
    /// From seeded noise (or the request's own latents).
    Text,
    /// From the init picture's latents noised to the first step's level.
    Img2Img,
    /// img2img whose kept region is put back after every step (an ordinary UNet).
    InpaintBlend,
    /// img2img with the mask and the masked picture's latents beside the latents at every step
    /// (an inpainting UNet, `in_channels` = 2 c + 1).
    InpaintCondition,
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
    /// Things the user should know that are not errors (a config asking for what cannot work),
    /// for each front end to word ([`Warning::render`]).
    pub warnings: Vec<Warning>,
    /// img2img / inpainting: the picture and mask at the size to make; `settings.schedule` then
    /// holds only the steps that run.
    pub init: Option<Arc<ResolvedInit>>,
    /// How the batch starts and what the UNet takes besides the latents.
    pub mode: BatchMode,
    /// The hires fix's second pass; `latent_shape` and `settings` are the first pass's.
    pub hires: Option<Arc<ResolvedHires>>,
}

/// An init picture (and mask) resolved against the model and the size to make.
#[derive(Debug, Clone)]
pub struct ResolvedInit {
    /// The picture at the size to make.
    pub image: image::RgbImage,
    pub strength: f64,
    /// Steps of the full schedule skipped (n - int(n S)).
    pub skipped_steps: usize,
    pub mask: Option<ResolvedMask>,
}

/// An inpainting mask at the size to make.
#[derive(Debug, Clone)]
pub struct ResolvedMask {
    /// Binarised: 255 repaints, 0 keeps.
    pub binary: image::GrayImage,
    /// Per pixel, how much of the generated picture to keep after decoding (the blurred mask), or
    /// `None` with `paste_back` off.
    pub paste_weights: Option<Vec<f32>>,
}

impl Job {
    /// Whether its images need the VAE encoder: an init picture, or a hires pass that encodes
    /// the upscaled picture.
    pub fn encodes_pictures(&self) -> bool {
        self.init.is_some()
            || self
                .hires
                .as_ref()
                .is_some_and(|h| h.upscaler == hires::HiresUpscaler::Lanczos)
    }

    /// Keeps only the images whose index `keep` accepts (e.g. those not yet on disk).
    pub fn keep_images(&mut self, keep: impl Fn(usize) -> bool) {
        self.images.retain(|&k| keep(k));
    }
}

/// What a model predicts: `requested` (`--prediction`) when given, else its scheduler config's
/// `prediction_type`.
pub fn model_prediction(
    requested: Option<Prediction>,
    config: &SchedulerConfig,
    config_path: &str,
) -> Result<Prediction, RequestError> {
    match requested {
        Some(p) => Ok(p),
        None => config.prediction_type.parse().map_err(|e: String| {
            RequestError::new(
                Field::Prediction,
                format!("is needed: {config_path} has a bad prediction_type ({e})"),
            )
        }),
    }
}

/// Whether zero terminal SNR can be sampled with a model that predicts `prediction`: not with
/// epsilon, whose first step would divide by sqrt(alpha_bar_T) = 0 (Lin et al. 2024, Section
/// 3.2). The one rule [`resolve`] enforces and `ablate` and the server's page build columns by.
pub fn zero_snr_applies(prediction: Prediction) -> bool {
    prediction != Prediction::Epsilon
}

/// Zero SNR and prediction type, with the one combination that cannot work caught; a config
/// that asks for it gets a warning and the rescale off, a request that asks for it an error.
fn resolve_prediction(
    request: &Request,
    config: &SchedulerConfig,
    config_path: &str,
    warnings: &mut Vec<Warning>,
) -> Result<(Prediction, bool), RequestError> {
    let prediction = model_prediction(request.prediction, config, config_path)?;
    let zero_snr = request.zero_snr.unwrap_or(config.rescale_betas_zero_snr);
    if zero_snr && !zero_snr_applies(prediction) {
        if request.zero_snr == Some(true) {
            return Err(RequestError::new(
                Field::ZeroSnr,
                "needs a v_prediction (or sample) model: with epsilon the first step divides by \
                 sqrt(alpha_bar_T) = 0; pass {zero_snr=false} or {prediction=v_prediction}",
            ));
        }
        warnings.push(Warning(format!(
            "warning: {config_path} asks for zero terminal SNR but the prediction type is epsilon, which cannot \
             sample from it; using {{zero_snr=false}}"
        )));
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

/// A failed check of `field`: shorthand for the many checks below.
fn check(ok: bool, field: Field, reason: impl FnOnce() -> String) -> Result<(), RequestError> {
    if ok {
        Ok(())
    } else {
        Err(RequestError::new(field, reason()))
    }
}

/// Width and height in latent pixels, checked against the VAE factor. Any multiple of it works,
/// as in diffusers: where the latents are not a multiple of the UNet's total stride, its
/// downsamplers round up and its upsamplers go back to the skip connections' sizes.
fn latent_size(configs: &ModelConfigs, request: &Request) -> Result<(usize, usize), RequestError> {
    let factor = configs.vae.downscale_factor();
    if let Some(latents) = &request.latents {
        let (_, _, h, w) = latents
            .dims4()
            .map_err(|e| RequestError::new(Field::Latents, format!("must be [B, C, H, W]: {e}")))?;
        for (field, given, derived) in [
            (Field::Height, request.height, h * factor),
            (Field::Width, request.width, w * factor),
        ] {
            if let Some(given) = given {
                check(given == derived, field, || {
                    format!("{given} disagrees with {{latents}} ({derived} px)")
                })?;
            }
        }
        return Ok((h, w));
    }
    // Without a width/height, img2img makes its picture's own size (rounded down), text to
    // image the UNet's sample size.
    let own = match &request.init_image {
        Some(init) => {
            let (w, h) = init.pixels.dimensions();
            let (w, h) = init_image::own_size(w, h, factor, &init.name)
                .map_err(|e| RequestError::new(Field::InitImage, format!("{e:#}")))?;
            (Some(w), Some(h))
        }
        None => {
            let default = configs.unet.sample_size.map(|s| s * factor);
            (default, default)
        }
    };
    let size = |field: Field, value: Option<usize>| -> Result<usize, RequestError> {
        let value = value.ok_or_else(|| RequestError::new(field, "is required: the UNet config has no sample_size"))?;
        check(value > 0 && value.is_multiple_of(factor), field, || {
            format!("{value} must be a positive multiple of {factor} (the VAE's factor)")
        })?;
        Ok(value / factor)
    };
    Ok((
        size(Field::Height, request.height.or(own.1))?,
        size(Field::Width, request.width.or(own.0))?,
    ))
}

/// `clip_skip` N must name a layer the text encoders have: 1..=layers (SD 1.x/2.x), and one
/// fewer for SDXL, whose N is `hidden_states[-(N + 1)]`.
fn check_clip_skip(configs: &ModelConfigs, clip_skip: usize) -> Result<(), RequestError> {
    let layers = configs.text_encoder.num_hidden_layers;
    let max = match &configs.text_encoder_2 {
        Some(second) => layers.min(second.num_hidden_layers).saturating_sub(1),
        None => layers,
    };
    check((1..=max).contains(&clip_skip), Field::ClipSkip, || {
        format!(
            "{clip_skip} must be between 1 (the last layer) and {max} (this model's text encoder has {layers} layers)"
        )
    })
}

/// What replaces a zero-SNR alpha_bar_T = 0 when a Karras or exponential ramp needs a finite
/// sigma_max and the user asked for `exact`: ComfyUI's and AUTOMATIC1111's value, the tools whose
/// users pick these ramps (with a warning that says so).
const RAMP_TERMINAL_ALPHA_BAR: TerminalAlphaBar = TerminalAlphaBar::Comfy;

/// Resolves one request into a job; every error names the setting it is about.
pub(super) fn resolve(configs: &ModelConfigs, mut request: Request) -> Result<Job, RequestError> {
    let scheduler = &configs.scheduler;
    let mut warnings = Vec::new();
    let (prediction, zero_snr) = resolve_prediction(&request, scheduler, &configs.scheduler_path, &mut warnings)?;
    if configs.unet.text_time.is_none() {
        if let Some(field) = request.micro.first_set_field() {
            return Err(RequestError::new(
                field,
                "applies to SDXL models only (a UNet with addition_embed_type \"text_time\"); this model has none",
            ));
        }
    }
    request.micro.check()?;
    check_clip_skip(configs, request.clip_skip)?;
    if request.vae_tiling {
        VaeTiling::new(&configs.vae)
            .map_err(|e| RequestError::new(Field::VaeTiling, format!("is not possible: {e}")))?;
    }
    let guidance = request.guidance;
    check(guidance >= 0.0, Field::Guidance, || {
        format!("{guidance} must not be negative")
    })?;
    let rescale = request.guidance_rescale;
    check((0.0..=1.0).contains(&rescale), Field::GuidanceRescale, || {
        format!("{rescale} must be within 0..1")
    })?;
    let eta = request.eta;
    check(eta >= 0.0, Field::Eta, || format!("{eta} must not be negative"))?;
    check(eta == 0.0 || request.sampler == Sampler::Ddim, Field::Eta, || {
        format!(
            "is DDIM's; with {{sampler={}}} drop it (for fresh noise at each step use {{sampler=euler_a}} or \
             {{sampler=dpmpp_2m_sde}})",
            request.sampler
        )
    })?;
    check(
        request.sigma_range == SigmaRange::Model || request.sigmas != SigmaSchedule::Schedule,
        Field::SigmaRange,
        || {
            format!(
                "{} places the ends of a noise-level ramp; give {{sigmas=karras}} or {{sigmas=exponential}} too",
                request.sigma_range
            )
        },
    )?;
    let betas = scheduler
        .beta_source()
        .map_err(|e| RequestError::new(Field::Steps, format!("cannot be scheduled: {e:#}")))?;
    let train_timesteps = betas.train_timesteps();
    let steps = request.steps;
    check((1..=train_timesteps).contains(&steps), Field::Steps, || {
        format!("{steps} must be between 1 and the model's {train_timesteps} training timesteps")
    })?;
    let spacing = request.spacing;
    let steps_offset = request.steps_offset.unwrap_or(scheduler.steps_offset);
    let spec = |steps: usize| ScheduleSpec {
        betas: betas.clone(),
        zero_terminal_snr: zero_snr,
        spacing,
        steps,
        steps_offset,
        set_alpha_to_one: scheduler.set_alpha_to_one,
    };
    let schedule = Schedule::new(&spec(steps))
        .map_err(|e| RequestError::new(Field::Steps, format!("{steps} with {{spacing={spacing}}}: {e:#}")))?;
    // A ramp that starts at t = T needs a finite sigma_max, which zero SNR does not have; one
    // between spaced timesteps below T (`--sigma-range spacing` with leading spacing) does not.
    let ramp_from_terminal =
        request.sigma_range == SigmaRange::Model || schedule.timesteps.first() == Some(&(train_timesteps - 1));
    if request.sigmas != SigmaSchedule::Schedule
        && zero_snr
        && request.terminal_alpha_bar == TerminalAlphaBar::Exact
        && ramp_from_terminal
    {
        warnings.push(Warning(format!(
            "warning: {{sigmas={}}} needs a finite sigma_max, which zero terminal SNR does not have; using \
             {{terminal_alpha_bar={RAMP_TERMINAL_ALPHA_BAR}}} (pass {{terminal_alpha_bar=diffusers}} for diffusers' value)",
            request.sigmas
        )));
        request.terminal_alpha_bar = RAMP_TERMINAL_ALPHA_BAR;
    }
    let (terminal, sigmas, sigma_range) = (request.terminal_alpha_bar, request.sigmas, request.sigma_range);
    let ramp = |schedule: Schedule| {
        schedule
            .with_terminal_alpha_bar(terminal)
            .with_sigma_ramp(sigmas, sigma_range)
            .map_err(|e| RequestError::new(Field::Sigmas, format!("{sigmas}: {e:#}")))
    };
    let schedule = ramp(schedule)?;
    let step = StepParams {
        prediction,
        eta: request.eta,
        clip_sample_range: scheduler.clip_sample.then_some(scheduler.clip_sample_range),
    };
    let sampling = |schedule: Schedule| SamplingSettings {
        schedule,
        sampler: request.sampler,
        step,
        guidance: request.guidance,
        guidance_rescale: request.guidance_rescale,
    };
    let mode = check_channels(configs, &request)?;
    let (h, w) = latent_size(configs, &request)?;
    let factor = configs.vae.downscale_factor();
    let init = resolve_init(&request, steps, (w * factor, h * factor), &mut warnings)?;
    let schedule = match &init {
        Some(init) => schedule
            .skip_steps(init.skipped_steps)
            .map_err(|e| RequestError::new(Field::Strength, format!("{e:#}")))?,
        None => schedule,
    };
    let settings = sampling(schedule);
    let hires = hires::resolve(
        &request.hires,
        steps,
        PixelSize {
            width: w * factor,
            height: h * factor,
        },
        (&request.prompt, &request.negative_prompt),
        (configs.vae.latent_channels, factor),
        request.init_image.is_some(),
        &|n| {
            let schedule =
                Schedule::new(&spec(n)).map_err(|e| RequestError::new(Field::HiresSteps, format!("{e:#}")))?;
            Ok(sampling(ramp(schedule)?))
        },
    )?;
    let in_latents = match &request.latents {
        Some(latents) => Some(
            latents
                .dim(0)
                .map_err(|e| RequestError::new(Field::Latents, format!("must be [B, C, H, W]: {e}")))?,
        ),
        None => None,
    };
    let num_images = match (in_latents, request.num_images) {
        (Some(held), Some(n)) if n != held => {
            return Err(RequestError::new(
                Field::NumImages,
                format!("{n} disagrees with {{latents}}, which holds {held} images"),
            ))
        }
        (Some(held), _) => held,
        (None, n) => n.unwrap_or(1),
    };
    check(num_images > 0, Field::NumImages, || "must be at least 1".to_string())?;
    check_hires_latents(&request, hires.as_ref(), num_images)?;
    let seeds: Vec<u64> = (0..num_images as u64).map(|k| request.seed.wrapping_add(k)).collect();
    Ok(Job {
        request,
        settings,
        zero_snr,
        steps_offset,
        latent_shape: (configs.vae.latent_channels, h, w),
        images: (0..seeds.len()).collect(),
        seeds,
        warnings,
        mode: match (&init, mode) {
            (None, _) => BatchMode::Text,
            (Some(init), _) if init.mask.is_none() => BatchMode::Img2Img,
            (Some(_), mode) => mode,
        },
        init: init.map(Arc::new),
        hires: hires.map(Arc::new),
    })
}

/// `hires_latents` needs a hires pass, and holds one row per image at its latent size.
fn check_hires_latents(request: &Request, hires: Option<&ResolvedHires>, images: usize) -> Result<(), RequestError> {
    let Some(latents) = &request.hires_latents else {
        return Ok(());
    };
    let Some(hires) = hires else {
        return Err(RequestError::new(
            Field::HiresLatents,
            "needs a second pass to act on: give {hires_scale} or {hires_size}",
        ));
    };
    let (c, h, w) = hires.latent_shape;
    let dims = latents.dims().to_vec();
    check(dims == [images, c, h, w], Field::HiresLatents, || {
        format!("has shape {dims:?}; the hires pass of {images} images takes [{images}, {c}, {h}, {w}]")
    })
}

/// The UNet's input channels: the latents' (text to image, img2img, blended inpainting), or
/// latents + mask + masked-picture latents (an inpainting UNet, which needs a mask). Returns how
/// this model inpaints.
fn check_channels(configs: &ModelConfigs, request: &Request) -> Result<BatchMode, RequestError> {
    let latent = configs.vae.latent_channels;
    match configs.unet.in_channels {
        c if c == latent => Ok(BatchMode::InpaintBlend),
        c if c == 2 * latent + 1 => {
            let field = if request.init_image.is_none() {
                Field::InitImage
            } else {
                Field::Mask
            };
            check(request.init_image.is_some() && request.mask.is_some(), field, || {
                format!(
                    "is needed: this is an inpainting model (its UNet takes {c} channels: latents, mask and \
                     masked picture); give {{init_image}} and {{mask}}"
                )
            })?;
            Ok(BatchMode::InpaintCondition)
        }
        c => Err(RequestError::new(
            Field::Prompt,
            format!(
                "cannot be drawn: the UNet takes {c} input channels, which is neither the VAE's {latent} latent \
                 channels nor an inpainting model's {}",
                2 * latent + 1
            ),
        )),
    }
}

/// Checks img2img's inputs and fits the picture and mask to the size to make (`width` x
/// `height` px); `None` for text to image.
fn resolve_init(
    request: &Request,
    steps: usize,
    (width, height): (usize, usize),
    warnings: &mut Vec<Warning>,
) -> Result<Option<ResolvedInit>, RequestError> {
    let needs = |field: Field, what: &str| RequestError::new(field, format!("needs {what}"));
    let Some(init) = &request.init_image else {
        if request.strength.is_some() {
            return Err(needs(Field::Strength, "{init_image} (the picture to start from)"));
        }
        if request.mask.is_some() {
            return Err(needs(Field::Mask, "{init_image} (the picture to inpaint)"));
        }
        if request.mask_blur.is_some() {
            return Err(needs(Field::MaskBlur, "{mask}"));
        }
        return Ok(None);
    };
    let strength = request.strength.unwrap_or(DEFAULT_STRENGTH);
    check(strength > 0.0 && strength <= 1.0, Field::Strength, || {
        format!("{strength} must be within (0, 1]: 1 starts from noise, smaller values keep more of the picture")
    })?;
    // diffusers' `get_timesteps`: int(n * strength) steps run, the first n - that are skipped.
    let run = ((steps as f64 * strength) as usize).min(steps);
    check(run > 0, Field::Strength, || {
        format!("{strength} with {{steps={steps}}} runs no step (int({steps} x {strength}) = 0); raise either")
    })?;
    let (iw, ih) = init.pixels.dimensions();
    if (iw as usize, ih as usize) != (width, height) {
        warnings.push(Warning(format!(
            "note: {{init_image}} {} is {iw}x{ih}; fitted to {width}x{height} with {{resize={}}}",
            init.name, request.resize
        )));
    }
    let image = init_image::resize_image(&init.pixels, width, height, request.resize);
    let mask = match &request.mask {
        None => {
            if request.mask_blur.is_some() {
                return Err(needs(Field::MaskBlur, "{mask}"));
            }
            None
        }
        Some(mask) => {
            let (mw, mh) = mask.pixels.dimensions();
            // Compared as cross products: equal aspect ratios (any size) resize alike.
            if u64::from(iw) * u64::from(mh) != u64::from(ih) * u64::from(mw) {
                warnings.push(Warning(format!(
                    "warning: {{mask}} {} is {mw}x{mh} but {{init_image}} {} is {iw}x{ih}; both are fitted to \
                     {width}x{height} with {{resize={}}}, so the mask may not cover what you drew it on",
                    mask.name, init.name, request.resize
                )));
            }
            let blur = request.mask_blur.unwrap_or(DEFAULT_MASK_BLUR);
            check(blur.is_finite() && blur >= 0.0, Field::MaskBlur, || {
                format!("{blur} must be 0 or more (px)")
            })?;
            let binary = init_image::resize_mask(&mask.pixels, width, height, request.resize);
            let paste_weights = request.paste_back.then(|| init_image::paste_weights(&binary, blur));
            Some(ResolvedMask { binary, paste_weights })
        }
    };
    Ok(Some(ResolvedInit {
        image,
        strength,
        skipped_steps: steps - run,
        mask,
    }))
}
