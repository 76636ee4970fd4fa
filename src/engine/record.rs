//! What an image records about how it was made: everything needed to make it again. The engine
//! fills one per image; `output::metadata` writes it into the PNG (as JSON and as AUTOMATIC1111
//! `parameters`), and `generate --from-image` reads it back.

use serde::{Deserialize, Serialize};

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
pub struct ImageSettings {
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
}
