//! What an image records about how it was made: everything needed to make it again. The engine
//! fills one per image; `output::metadata` writes it into the PNG (as JSON and as AUTOMATIC1111
//! `parameters`), and `generate --from-image` reads it back.

use serde::{Deserialize, Serialize};

use super::hires::HiresResize;
use super::micro::MicroConditioning;
use super::request::{Job, ResolvedInit, DEFAULT_CLIP_SKIP, DEFAULT_MASK_BLUR};
use crate::prompt::Emphasis;
use crate::schedule::BetaSource;
use crate::weights::loader::ModelConfigs;
use crate::weights::lora::Loras;

/// The scheduler values an image was sampled with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchedulerRecord {
    pub beta_schedule: String,
    pub beta_start: f64,
    pub beta_end: f64,
    pub num_train_timesteps: usize,
    pub trained_betas: bool,
    pub steps_offset: usize,
    pub set_alpha_to_one: bool,
    pub clip_sample: bool,
    pub timesteps: Vec<usize>,
}

/// How an img2img or inpainting image used its init picture (absent for text to image, so
/// those images keep their bytes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Img2ImgRecord {
    /// The init picture as named (a path relative to where sdfix ran, or a label).
    pub init_image: String,
    /// SHA-256 of its file: `--from-image` re-runs only with the same picture.
    pub init_image_sha256: String,
    pub strength: f64,
    /// `--resize` (crop, fit, stretch).
    pub resize: String,
    /// `--vae-encode` (sample, mean).
    pub vae_encode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_blur: Option<f64>,
    #[serde(default = "yes")]
    pub paste_back: bool,
}

fn yes() -> bool {
    true
}

/// The hires fix an image was made with (absent without one, so those images keep their bytes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HiresRecord {
    /// `--hires-scale` (A1111's `Hires upscale`), or
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
    /// `--hires-size` (A1111's `Hires resize`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<HiresResize>,
    /// `--hires-upscaler`, sdfix's name.
    pub upscaler: String,
    /// `--hires-steps` as given: 0 takes the first pass's.
    pub steps: usize,
    /// `--hires-strength`.
    pub strength: f64,
    /// The second pass's own prompt, negative prompt and sampler (sdfix's name), where they
    /// differ from the first pass's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampler: Option<String>,
}

/// What images made before `--sampler` existed (no `sampler` key) were made with.
const DEFAULT_SAMPLER: &str = "ddim";
/// What images made before `--terminal-alpha-bar` existed were made with.
const DEFAULT_TERMINAL_ALPHA_BAR: &str = "exact";

fn default_sampler() -> String {
    DEFAULT_SAMPLER.to_string()
}

fn is_default_sampler(s: &str) -> bool {
    s == DEFAULT_SAMPLER
}

fn default_terminal_alpha_bar() -> String {
    DEFAULT_TERMINAL_ALPHA_BAR.to_string()
}

fn is_default_terminal_alpha_bar(s: &str) -> bool {
    s == DEFAULT_TERMINAL_ALPHA_BAR
}

/// What images made before `--sigmas` existed were made with.
const DEFAULT_SIGMAS: &str = "schedule";

fn default_sigmas() -> String {
    DEFAULT_SIGMAS.to_string()
}

fn is_default_sigmas(s: &str) -> bool {
    s == DEFAULT_SIGMAS
}

/// What images made before `--sigma-range` existed were made with.
const DEFAULT_SIGMA_RANGE: &str = "model";

fn default_sigma_range() -> String {
    DEFAULT_SIGMA_RANGE.to_string()
}

fn is_default_sigma_range(s: &str) -> bool {
    s == DEFAULT_SIGMA_RANGE
}

/// A LoRA merged into the model: its file name (without extension), A1111's short hash of it, and
/// its weight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSetting {
    pub name: String,
    pub hash: String,
    pub weight: f64,
}

/// Everything needed to make an image again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// `sdfix <version>`.
    pub version: String,
    /// Folder path or hub repo id, as given to --model.
    pub model: String,
    pub revision: Option<String>,
    /// A1111's short hash of a single-file checkpoint (first 10 hex digits of its SHA-256); left
    /// out for folders and hub repos.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_hash: Option<String>,
    /// The `--lora` files merged into the model; left out when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<LoraSetting>,
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    pub steps: usize,
    pub guidance: f64,
    pub guidance_rescale: f64,
    pub spacing: String,
    pub zero_snr: bool,
    pub prediction: String,
    pub eta: f64,
    /// `--sampler` (ddim, euler, ...). Left out of the JSON when it is ddim, and read as ddim when
    /// absent: DDIM images keep the bytes they had before samplers existed, and old PNGs still
    /// re-run with `--from-image`.
    #[serde(default = "default_sampler", skip_serializing_if = "is_default_sampler")]
    pub sampler: String,
    /// `--terminal-alpha-bar` (exact, comfy, diffusers); left out when exact, as `sampler`.
    #[serde(
        default = "default_terminal_alpha_bar",
        skip_serializing_if = "is_default_terminal_alpha_bar"
    )]
    pub terminal_alpha_bar: String,
    /// `--sigmas` (schedule, karras, exponential); left out when schedule, as `sampler`.
    #[serde(default = "default_sigmas", skip_serializing_if = "is_default_sigmas")]
    pub sigmas: String,
    /// `--sigma-range` (model, spacing); left out when model, as `sampler`.
    #[serde(default = "default_sigma_range", skip_serializing_if = "is_default_sigma_range")]
    pub sigma_range: String,
    pub width: usize,
    pub height: usize,
    pub dtype: String,
    pub device: String,
    /// Whether the initial noise came from a --latents file instead of the seed.
    pub from_latents_file: bool,
    pub scheduler: SchedulerRecord,
    /// img2img and inpainting: the init picture, strength and mask.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub img2img: Option<Img2ImgRecord>,
    /// SDXL's micro-conditioning, each value only when set.
    #[serde(flatten)]
    pub micro: MicroConditioning,
    /// SDXL: an empty negative prompt was encoded, not zeroed; left out when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub encode_empty_negative: bool,
    /// `--emphasis`; left out when original (A1111's default), so older PNGs read back.
    #[serde(default, skip_serializing_if = "is_default_emphasis")]
    pub emphasis: Emphasis,
    /// `--clip-skip`; left out when 1.
    #[serde(default = "default_clip_skip", skip_serializing_if = "is_default_clip_skip")]
    pub clip_skip: usize,
    /// `--pad-conds`; left out when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pad_conds: bool,
    /// `--vae-tiling`; left out when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vae_tiling: bool,
    /// The hires fix; `width` and `height` are then the first pass's (A1111's `Size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hires: Option<HiresRecord>,
}

fn is_default_emphasis(emphasis: &Emphasis) -> bool {
    *emphasis == Emphasis::default()
}

fn default_clip_skip() -> usize {
    DEFAULT_CLIP_SKIP
}

fn is_default_clip_skip(clip_skip: &usize) -> bool {
    *clip_skip == DEFAULT_CLIP_SKIP
}

/// What the engine records in image `k` of `job`.
pub(super) struct RecordContext<'a> {
    pub configs: &'a ModelConfigs,
    pub model: &'a str,
    pub revision: Option<&'a str>,
    pub model_hash: Option<&'a str>,
    /// The engine's LoRAs (`--lora`), recorded for requests that name none of their own.
    pub default_loras: &'a Loras,
    pub dtype: &'a str,
    pub device: &'a str,
}

impl RecordContext<'_> {
    fn img2img_record(&self, job: &Job, init: &ResolvedInit) -> Img2ImgRecord {
        let request = &job.request;
        let source = request.init_image.as_ref();
        Img2ImgRecord {
            init_image: source.map(|i| i.name.clone()).unwrap_or_default(),
            init_image_sha256: source.map(|i| i.sha256.clone()).unwrap_or_default(),
            strength: init.strength,
            resize: request.resize.to_string(),
            vae_encode: request.vae_encode.to_string(),
            mask: request.mask.as_ref().map(|m| m.name.clone()),
            mask_sha256: request.mask.as_ref().map(|m| m.sha256.clone()),
            mask_blur: init
                .mask
                .as_ref()
                .map(|_| request.mask_blur.unwrap_or(DEFAULT_MASK_BLUR)),
            paste_back: request.paste_back,
        }
    }

    pub fn image_record(&self, job: &Job, k: usize) -> ImageRecord {
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
        ImageRecord {
            version: format!("sdfix {}", env!("CARGO_PKG_VERSION")),
            model: self.model.to_string(),
            revision: self.revision.map(str::to_string),
            model_hash: self.model_hash.map(str::to_string),
            loras: job
                .request
                .loras
                .as_deref()
                .unwrap_or(self.default_loras)
                .records()
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
            prediction: job.settings.step.prediction.name().to_string(),
            eta: job.settings.step.eta,
            sampler: job.settings.sampler.name().to_string(),
            terminal_alpha_bar: job.request.terminal_alpha_bar.name().to_string(),
            sigmas: job.request.sigmas.name().to_string(),
            sigma_range: job.request.sigma_range.name().to_string(),
            width: w * factor,
            height: h * factor,
            dtype: self.dtype.to_string(),
            device: self.device.to_string(),
            from_latents_file: job.request.latents.is_some() || job.request.hires_latents.is_some(),
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
            img2img: job.init.as_ref().map(|init| self.img2img_record(job, init)),
            micro: job.request.micro,
            encode_empty_negative: job.request.encode_empty_negative,
            emphasis: job.request.emphasis,
            clip_skip: job.request.clip_skip,
            pad_conds: job.request.pad_conds,
            vae_tiling: job.request.vae_tiling,
            hires: job.hires.as_ref().map(|hires| HiresRecord {
                scale: job.request.hires.scale,
                size: job.request.hires.size,
                upscaler: hires.upscaler.name().to_string(),
                steps: job.request.hires.steps.unwrap_or(0),
                strength: hires.strength,
                prompt: hires.prompt.clone(),
                negative_prompt: hires.negative_prompt.clone(),
                sampler: hires.sampler.map(|s| s.name().to_string()),
            }),
        }
    }
}
