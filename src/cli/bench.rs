//! `sdfix bench`: how fast the pipeline's stages run on the real SD architectures, with random
//! weights (no download). Same fields as `scripts/bench_diffusers.py`, so
//! `scripts/bench_compare.sh` can put the two side by side.
//!
//! The stages run through the same code as `generate`: [`TextEncoder::encode`], the pipeline's
//! denoising loop ([`pipeline::denoise`], timed between its per-step hooks) and its decode. Each
//! stage gets one untimed warm-up run, then: text encoding (prompt + negative prompt, one batch)
//! and the VAE decode `--repeat` times; `--steps` denoising steps with CFG (the UNet sees batch
//! 2 x --batch-size), each timed from the previous step's hook to its own (UNet + guidance + DDIM);
//! the guidance + DDIM part alone ([`pipeline::sampler_step`]) `--steps` times. Median and minimum
//! are reported; `total_s` is text + steps x step + VAE from the medians. Peak memory is the process's
//! peak RSS (VmHWM) on the CPU; on CUDA the peak device memory in use from before the weights are
//! made to the end, sampled every millisecond ([`device::MemoryWatch`]).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use clap::Args;
use serde_json::json;

use super::args::{at_least_one, DeviceArgs, SizeArgs};
use crate::config::clip::ClipTextConfig;
use crate::config::unet::{UNetConfig, UNetSpec};
use crate::config::vae::VaeConfig;
use crate::device;
use crate::engine::micro::{MicroConditioning, PixelSize};
use crate::kernels::profile;
use crate::model::clip::ClipTextTransformer;
use crate::model::stable_diffusion::{ClipEncoder, StableDiffusion, TextEncoder};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::UNet2DConditionModel;
use crate::model::unet::{Conditioning, CrossAttentionCache, TextTime};
use crate::model::vae::Vae;
use crate::pipeline::{self, BatchInput, SamplingSettings};
use crate::sampling::noise::ImageNoise;
use crate::sampling::sampler::Sampler;
use crate::sampling::step::{MultistepState, StepParams};
use crate::sampling::Prediction;
use crate::schedule::{BetaSource, Schedule, ScheduleSpec, TimestepSpacing};

/// The public configs of the architectures `--arch` names, compiled in (models/arch): UNet,
/// text encoder, VAE, and SDXL's second text encoder.
const ARCHS: &[(&str, [&str; 3], Option<&str>)] = &[
    (
        "sd1.5",
        [
            include_str!("../../models/arch/sd1.5/unet/config.json"),
            include_str!("../../models/arch/sd1.5/text_encoder/config.json"),
            include_str!("../../models/arch/sd1.5/vae/config.json"),
        ],
        None,
    ),
    (
        "sd2.1-base",
        [
            include_str!("../../models/arch/sd2.1-base/unet/config.json"),
            include_str!("../../models/arch/sd2.1-base/text_encoder/config.json"),
            include_str!("../../models/arch/sd2.1-base/vae/config.json"),
        ],
        None,
    ),
    (
        "sd2.1",
        [
            include_str!("../../models/arch/sd2.1/unet/config.json"),
            include_str!("../../models/arch/sd2.1/text_encoder/config.json"),
            include_str!("../../models/arch/sd2.1/vae/config.json"),
        ],
        None,
    ),
    (
        "sdxl",
        [
            include_str!("../../models/arch/sdxl/unet/config.json"),
            include_str!("../../models/arch/sdxl/text_encoder/config.json"),
            include_str!("../../models/arch/sdxl/vae/config.json"),
        ],
        Some(include_str!("../../models/arch/sdxl/text_encoder_2/config.json")),
    ),
];

/// What `--arch` names: the configs to build random-weight modules from.
struct ArchConfigs {
    unet: UNetSpec,
    text_encoder: ClipTextConfig,
    /// SDXL's second text encoder.
    text_encoder_2: Option<ClipTextConfig>,
    vae: VaeConfig,
    name: String,
}

const PROMPT: &str = "a photo of an astronaut riding a horse on mars";

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// sd2.1-base, sd2.1, sd1.5, tiny (the built-in demo model's shapes), or a diffusers-layout
    /// folder whose configs to use.
    #[arg(long, default_value = "sd2.1-base")]
    pub arch: String,

    #[command(flatten)]
    pub size: SizeArgs,

    /// Timed denoising steps (after one warm-up).
    #[arg(long, default_value_t = 20, value_parser = at_least_one)]
    pub steps: usize,

    /// Images per batch (the UNet sees twice as many with CFG).
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    pub batch_size: usize,

    /// Timed runs of the text encoder and the VAE (after one warm-up).
    #[arg(long, default_value_t = 3, value_parser = at_least_one)]
    pub repeat: usize,

    #[command(flatten)]
    pub device: DeviceArgs,

    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,

    /// Also report the time per kind of op (conv 3x3, conv 1x1, linear, attention, group norm,
    /// gelu, upsample; "other" is the rest) in each stage, per run, as `op_ms`, and the linear
    /// layers' time per shape as `linear_ms_by_shape`. On a GPU each timed op waits for the
    /// device before and after it (the waits slow the run down: compare its op times with each
    /// other, and stage times with an unprofiled run); not with SDFIX_CUDA_GRAPHS=1.
    #[arg(long)]
    pub profile: bool,

    /// Build and time the VAE decoder alone, on Gaussian latents of --width x --height (with
    /// --vae-tiling, in tiles): no text encoder, no UNet, no warm-up run, so that the peak memory
    /// is the decode's and a large size takes one decode per --repeat.
    #[arg(long, conflicts_with = "profile")]
    pub vae_only: bool,
}

/// Median and minimum of timings, in milliseconds.
fn summary(ms: &mut [f64]) -> serde_json::Value {
    ms.sort_by(f64::total_cmp);
    json!({"median": ms[ms.len() / 2], "min": ms[0]})
}

fn median(ms: &[f64]) -> f64 {
    let mut sorted = ms.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// Runs `f` once untimed, then `times` times; returns the timings in ms, synchronising the
/// device around each run so asynchronous GPU work is counted.
fn time(device: &Device, times: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    f()?;
    device.synchronize()?;
    profile::take();
    profile::take_details();
    let mut ms = Vec::with_capacity(times);
    for _ in 0..times {
        let started = Instant::now();
        f()?;
        device.synchronize()?;
        ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(ms)
}

/// The op times recorded since the stage's warm-up, per run, in ms, with "other" the rest of the
/// stage's mean time; and the linear layers' by shape (`rows x in x out`: ms and calls per run).
fn op_ms(ms: &[f64]) -> (serde_json::Value, serde_json::Value) {
    let runs = ms.len() as f64;
    let mut ops = serde_json::Map::new();
    let mut timed = 0.0;
    for (op, seconds, _) in profile::take() {
        let per_run = seconds * 1000.0 / runs;
        timed += per_run;
        ops.insert(op.to_string(), json!(per_run));
    }
    let mean = ms.iter().sum::<f64>() / runs;
    ops.insert("other".to_string(), json!((mean - timed).max(0.0)));
    let mut shapes = serde_json::Map::new();
    for (_, shape, seconds, calls) in profile::take_details() {
        shapes.insert(
            shape,
            json!({"ms": seconds * 1000.0 / runs, "calls": calls as f64 / runs}),
        );
    }
    (serde_json::Value::Object(ops), serde_json::Value::Object(shapes))
}

/// Weights drawn from each tensor's initialiser as the model asks for them, and kept by the model
/// alone (a `VarMap` would keep a second reference to every tensor, so layers that re-lay their
/// weights out at load would hold both copies), like weights read from a file.
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(&self, s: Shape, _: &str, init: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        // Detached: a variable would make every op on it (a layer transposing its weight at
        // load) keep the original alive for backprop.
        Ok(init.var(s, dtype, dev)?.into_inner().detach())
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

/// The process's peak resident memory, in MB (Linux), or `None`.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// `--vae-only`: the VAE decoder on random weights, `--repeat` decodes of Gaussian latents
/// (through [`pipeline::decode`] and the conversion to 8-bit, as `generate`), with the peak
/// memory of the process (CPU) or above the start (CUDA).
fn vae_only(
    args: &BenchArgs,
    vae_config: &VaeConfig,
    arch: &str,
    (width, height): (usize, usize),
    out: &mut impl std::io::Write,
) -> Result<()> {
    let (device, dtype) = args.device.resolve()?;
    let factor = vae_config.downscale_factor();
    let memory_watch = device::MemoryWatch::start(&device);
    let vae_dtype = Vae::decode_dtype(vae_config, dtype);
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), vae_dtype, device.clone());
    let started = Instant::now();
    let vae = Vae::new(vb.pp("vae"), vae_config)?;
    let build_s = started.elapsed().as_secs_f64();
    let seeds: Vec<u64> = (0..args.batch_size as u64).collect();
    let latents =
        ImageNoise::new(&seeds).sample((vae_config.latent_channels, height / factor, width / factor), &device)?;
    let mut vae_ms = Vec::with_capacity(args.repeat);
    for _ in 0..args.repeat {
        let started = Instant::now();
        let latents = latents.to_dtype(vae_dtype)?;
        let images = if args.size.vae_tiling {
            vae.decode_tiled(&latents)?
        } else {
            vae.decode(&latents)?
        };
        pipeline::to_u8(&images.to_dtype(DType::F32)?)?;
        device.synchronize()?;
        vae_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let peak_memory_mb = match memory_watch {
        Some(watch) => watch.finish(),
        None => peak_rss_mb(),
    };
    let report = json!({
        "tool": "sdfix",
        "arch": arch,
        "width": width,
        "height": height,
        "batch_size": args.batch_size,
        "dtype": format!("{vae_dtype:?}").to_lowercase(),
        "device": device::describe(&device),
        "vae_tiling": args.size.vae_tiling,
        "build_s": build_s,
        "vae_decode_ms": summary(&mut vae_ms),
        "peak_memory_mb": peak_memory_mb,
    });
    if args.json {
        writeln!(out, "{report}")?;
    } else {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

/// The configs of `arch`: compiled in, the demo model's, or a folder's.
fn configs(arch: &str) -> Result<ArchConfigs> {
    let (texts, second): ([String; 3], Option<String>) =
        if let Some((_, texts, second)) = ARCHS.iter().find(|(name, _, _)| *name == arch) {
            (texts.map(str::to_string), second.map(str::to_string))
        } else {
            let folder: PathBuf = match arch {
                "tiny" => crate::weights::demo::folder("demo")?.context("the built-in demo model is missing")?,
                path if Path::new(path).is_dir() => PathBuf::from(path),
                other => bail!("--arch {other}: expected sd2.1-base, sd2.1, sd1.5, sdxl, tiny or a model folder"),
            };
            let read = |part: &str| {
                let path = folder.join(part).join("config.json");
                std::fs::read_to_string(&path).with_context(|| format!("--arch {arch}: cannot read {}", path.display()))
            };
            let second = if folder.join("text_encoder_2/config.json").is_file() {
                Some(read("text_encoder_2")?)
            } else {
                None
            };
            ([read("unet")?, read("text_encoder")?, read("vae")?], second)
        };
    let unet = serde_json::from_str::<UNetConfig>(&texts[0])?
        .resolve()
        .context("unet config")?;
    let text_encoder: ClipTextConfig = serde_json::from_str(&texts[1]).context("text_encoder config")?;
    let text_encoder_2 = second
        .map(|text| serde_json::from_str::<ClipTextConfig>(&text).context("text_encoder_2 config"))
        .transpose()?;
    let vae: VaeConfig = serde_json::from_str(&texts[2]).context("vae config")?;
    vae.validate()?;
    Ok(ArchConfigs {
        unet,
        text_encoder,
        text_encoder_2,
        vae,
        name: arch.to_string(),
    })
}

/// The pipeline's settings for the benchmark: the paper's (v-prediction, zero terminal SNR,
/// trailing, CFG 7.5 rescaled by 0.7), `steps` steps.
fn bench_settings(steps: usize) -> Result<SamplingSettings> {
    Ok(SamplingSettings {
        schedule: Schedule::new(&ScheduleSpec {
            betas: BetaSource::STABLE_DIFFUSION,
            zero_terminal_snr: true,
            spacing: TimestepSpacing::Trailing,
            steps,
            steps_offset: 1,
            set_alpha_to_one: false,
        })?,
        sampler: Sampler::Ddim,
        step: StepParams {
            prediction: Prediction::VPrediction,
            eta: 0.0,
            clip_sample_range: None,
        },
        guidance: 7.5,
        guidance_rescale: 0.7,
    })
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let ArchConfigs {
        unet: unet_spec,
        text_encoder: clip_config,
        text_encoder_2: clip_config_2,
        vae: vae_config,
        name: arch,
    } = configs(&args.arch)?;
    let (device, dtype) = args.device.resolve()?;
    let factor = vae_config.downscale_factor();
    let multiple = factor << unet_spec.downsamples();
    let default_size = unet_spec.sample_size.unwrap_or(64) * factor;
    let (width, height) = (
        args.size.width.unwrap_or(default_size),
        args.size.height.unwrap_or(default_size),
    );
    for (flag, value) in [("--width", width), ("--height", height)] {
        if value == 0 || !value.is_multiple_of(multiple) {
            bail!("{flag} {value} must be a positive multiple of {multiple}");
        }
    }

    if args.vae_only {
        return vae_only(args, &vae_config, &arch, (width, height), &mut out);
    }

    // Random weights (candle-nn's initialisers): the shapes are what matter for timing.
    if args.profile {
        if device.is_cpu() {
            profile::enable();
        } else if crate::kernels::cuda_settings::lever_on(&device, |s| s.graphs) {
            bail!("--profile waits for the GPU after each op, which a CUDA graph capture cannot do: unset SDFIX_CUDA_GRAPHS or drop --profile");
        } else {
            profile::enable_synchronized(&device);
        }
    }
    let memory_watch = device::MemoryWatch::start(&device);
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), dtype, device.clone());
    let vae_dtype = Vae::decode_dtype_on(&vae_config, dtype, &device);
    // As `generate` does for a short run: encode, free the text encoder, then build the UNet and
    // the VAE, so their weights are never resident beside the text encoder's.
    let started = Instant::now();
    let tokenizer_folder = crate::weights::demo::folder("demo")?.context("the built-in demo model is missing")?;
    let tokenizer = ClipTokenizer::from_folder(&tokenizer_folder.join("tokenizer"))?;
    let mut text_encoder = TextEncoder::new(
        tokenizer,
        ClipTextTransformer::new(vb.pp("text_encoder"), &clip_config)?,
        &device,
    );
    if let Some(config) = &clip_config_2 {
        text_encoder = text_encoder.with_second(ClipEncoder {
            tokenizer: ClipTokenizer::from_folder(&tokenizer_folder.join("tokenizer"))?,
            model: ClipTextTransformer::new(vb.pp("text_encoder_2"), config)?,
        });
    }
    let mut build_s = started.elapsed().as_secs_f64();

    let b = args.batch_size;
    let (h, w) = (height / factor, width / factor);
    let channels = unet_spec.in_channels;
    // Uncond first, as the pipeline batches them.
    let texts: Vec<&str> = std::iter::repeat_n("", b)
        .chain(std::iter::repeat_n(PROMPT, b))
        .collect();
    let mut context = None;
    let mut text_ms = time(&device, args.repeat, || {
        context = Some(text_encoder.encode_prompts(&texts)?);
        Ok(())
    })?;
    let (text_ops, text_linear_shapes) = op_ms(&text_ms);
    let context = context.context("text encoder produced nothing")?;
    // SDXL: the pooled embeddings and the default micro-conditioning (the image's own size).
    let rows = |start: usize| -> Result<Conditioning> {
        let text_time = match &context.pooled {
            Some(pooled) => Some(TextTime {
                text_embeds: pooled.narrow(0, start, b)?,
                time_ids: vec![MicroConditioning::default().time_ids(PixelSize { width, height }).0; b],
            }),
            None => None,
        };
        Ok(Conditioning {
            context: context.context.narrow(0, start, b)?,
            text_time,
        })
    };
    let (uncond, cond) = (rows(0)?, rows(b)?);
    let both = Conditioning::cat(&[&uncond, &cond])?;
    drop(text_encoder);

    let started = Instant::now();
    let unet = UNet2DConditionModel::new(vb.pp("unet"), &unet_spec)?;
    let vae = Vae::new(vb.pp("vae").to_dtype(vae_dtype), &vae_config)?;
    let model = StableDiffusion::new(unet, vae, dtype, vae_dtype, &device);
    build_s += started.elapsed().as_secs_f64();

    let seeds: Vec<u64> = (0..b as u64).collect();
    let latents = ImageNoise::new(&seeds).sample((channels, h, w), &device)?;
    // Warm-up: one UNet pass on the CFG batch, whose output also feeds the sampler-step timing.
    let input_for_submit = Tensor::cat(&[&latents, &latents], 0)?.to_dtype(dtype)?;
    let unet_output = model
        .unet()?
        .forward_cached(&input_for_submit, 999.0, &both, &mut CrossAttentionCache::new())?
        .to_dtype(DType::F32)?;
    device.synchronize()?;
    profile::take();
    profile::take_details();

    // The denoising loop itself, each step timed from one hook to the next.
    let settings = bench_settings(args.steps)?;
    let mut unet_ms = Vec::with_capacity(args.steps);
    let mut sync_error = None;
    let mut last = Instant::now();
    let (cond_rows, uncond_rows) = (cond.rows()?, uncond.rows()?);
    let input = BatchInput {
        latents: latents.clone(),
        cond: &cond_rows,
        uncond: Some(&uncond_rows),
        settings: &settings,
        inpainting: None,
        vae_tiling: args.size.vae_tiling,
    };
    pipeline::denoise(&model, input, &mut ImageNoise::new(&seeds), &mut |_| {
        if let Err(err) = device.synchronize() {
            sync_error.get_or_insert(err);
        }
        let now = Instant::now();
        unet_ms.push(now.duration_since(last).as_secs_f64() * 1000.0);
        last = now;
        Ok(())
    })?;
    if let Some(err) = sync_error {
        return Err(err.into());
    }
    let (unet_ops, unet_linear_shapes) = op_ms(&unet_ms);

    // How long the host takes to queue one UNet forward (CFG batch), before synchronising: on a GPU,
    // a step whose submit time is close to its step time is host-bound (candle's per-op overhead),
    // not GPU-bound. On the CPU, ops run as they are called and both are the same.
    let mut unet_submit_ms = Vec::with_capacity(args.repeat);
    for _ in 0..args.repeat {
        device.synchronize()?;
        let started = Instant::now();
        let output = model
            .unet()?
            .forward_cached(&input_for_submit, 999.0, &both, &mut CrossAttentionCache::new())?;
        unet_submit_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        device.synchronize()?;
        drop(output);
    }

    let mut ddim_ms = time(&device, args.steps, || {
        pipeline::sampler_step(
            &settings,
            0,
            &latents,
            &unet_output,
            &mut MultistepState::default(),
            None,
        )?;
        Ok(())
    })?;

    // As `generate` does once its last denoising step is done, the VAE decodes with the UNet
    // freed (`Engine::release_unet_when_done`): the peak memory is then the larger of the two
    // phases, not their sum.
    model.release_unet();
    // The initial (Gaussian) latents, not the loop's: random weights can drive those anywhere,
    // and diffusers' benchmark decodes Gaussian latents too.
    let mut vae_ms = time(&device, args.repeat, || {
        pipeline::to_u8(&pipeline::decode(&model, &latents, args.size.vae_tiling)?)?;
        Ok(())
    })?;
    let (vae_ops, vae_linear_shapes) = op_ms(&vae_ms);

    let peak_memory_mb = match memory_watch {
        Some(watch) => watch.finish(),
        None => peak_rss_mb(),
    };
    let total_s = (median(&text_ms) + args.steps as f64 * median(&unet_ms) + median(&vae_ms)) / 1000.0;
    let mut report = json!({
        "tool": "sdfix",
        "arch": arch,
        "width": width,
        "height": height,
        "steps": args.steps,
        "batch_size": b,
        "dtype": format!("{dtype:?}").to_lowercase(),
        "vae_dtype": format!("{vae_dtype:?}").to_lowercase(),
        "device": device::describe(&device),
        "threads": std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
        "build_s": build_s,
        "text_encode_ms": summary(&mut text_ms),
        "unet_step_ms": summary(&mut unet_ms),
        "unet_submit_ms": summary(&mut unet_submit_ms),
        "cuda_settings": crate::kernels::cuda_settings::applied().describe(),
        "ddim_guidance_ms": summary(&mut ddim_ms),
        "vae_decode_ms": summary(&mut vae_ms),
        "total_s": total_s,
        "peak_memory_mb": peak_memory_mb,
    });
    if args.profile {
        report["op_ms"] = json!({"text_encode": text_ops, "unet_step": unet_ops, "vae_decode": vae_ops});
        report["profile_synchronized"] = json!(!device.is_cpu());
        report["linear_ms_by_shape"] = json!({
            "text_encode": text_linear_shapes,
            "unet_step": unet_linear_shapes,
            "vae_decode": vae_linear_shapes,
        });
    }
    if args.json {
        writeln!(out, "{report}")?;
    } else {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}
