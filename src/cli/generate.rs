//! `sdfix generate`: prompts to PNGs, with the paper's fixes on by default.
//!
//! Flags -> [`Request`]s (one per prompt, with each prompt-file line's overrides) -> the
//! [`Engine`] -> PNGs, latents and `manifest.jsonl` written as each image arrives. Every check
//! runs before any weight is loaded: the model's configs and each request's settings (in the
//! engine), the output files (here). A bad prompt-file line is reported with its file:line and
//! skipped; the rest runs and the exit code says something failed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;

use super::args::{
    at_least_one, base_request, read_init_image, read_mask, DeviceArgs, Img2ImgArgs, Img2ImgInputs, ModelArgs,
    PromptArgs, SamplerArgs, SizeArgs, VerbosityArgs,
};
use crate::device::{self, DeviceChoice};
use crate::engine::request::check_latents;
use crate::engine::{Engine, GeneratedImage, ImageSettings, Job, Observer, Request};
use crate::output::metadata;
use crate::output::{manifest, png};
use crate::pipeline::StepInfo;
use crate::progress::{Progress, Verbosity};
use crate::prompts::{self, LineError, LineOverrides, PromptEntry};
use crate::weights::demo::DEMO_MODELS;
use crate::weights::lora::{LoraSpec, Loras};

pub use super::shard::{Shard, ShardArg};

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "prompts", "from_image"])))]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub prompts: PromptArgs,

    /// Re-run the exact settings recorded in a PNG made by sdfix (its device and dtype too,
    /// unless --device or --dtype is given).
    #[arg(long, value_name = "IMAGE.png", conflicts_with_all = ["model", "revision", "latents"])]
    pub from_image: Option<PathBuf>,

    #[command(flatten)]
    pub sampler: SamplerArgs,

    /// Seed of image 0 of each prompt; image k uses seed + k [default: random, printed].
    #[arg(long)]
    pub seed: Option<u64>,

    /// Images per prompt [default: 1, or the batch of --latents].
    #[arg(long, value_parser = at_least_one)]
    pub num_images: Option<usize>,

    /// Images per UNet batch (CFG doubles it).
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    pub batch_size: usize,

    #[command(flatten)]
    pub size: SizeArgs,

    #[command(flatten)]
    pub img2img: Img2ImgArgs,

    /// Initial latents instead of seeded noise (with --prompt): a safetensors file with a tensor
    /// "latents", [C, H, W] or [B, C, H, W]; with --init-image, the noise added to its latents.
    #[arg(long, value_name = "FILE", conflicts_with = "prompts")]
    pub latents: Option<PathBuf>,

    /// Also write the final latents (before the VAE, not divided by its scaling factor) as
    /// IMAGE.latents.safetensors beside each IMAGE.png.
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

    /// Take only the prompt entries whose index mod N is I (one worker of N); `auto` reads I and
    /// N from a Slurm job array or a Kubernetes Indexed Job (with --shard-count).
    #[arg(long, value_name = "I/N|auto")]
    pub shard: Option<ShardArg>,

    /// N for --shard auto under Kubernetes (the Job's completions; pods are not told it).
    #[arg(long, value_name = "N", requires = "shard", value_parser = at_least_one)]
    pub shard_count: Option<usize>,

    #[command(flatten)]
    pub device: DeviceArgs,

    /// The original, flawed pipeline for side-by-side runs: leading timesteps, no zero-SNR
    /// rescale, no CFG rescale.
    #[arg(long, conflicts_with_all = ["spacing", "zero_snr", "no_zero_snr", "guidance_rescale"])]
    pub baseline: bool,

    #[command(flatten)]
    pub verbosity: VerbosityArgs,
}

/// Reads --latents: [C, H, W] or [B, C, H, W], f32, on the CPU.
fn read_latents(path: &Path, channels: usize) -> Result<Tensor> {
    let what = format!("--latents {}", path.display());
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu).with_context(|| what.clone())?;
    let latents = tensors
        .remove("latents")
        .with_context(|| format!("{what}: no tensor named \"latents\""))?;
    check_latents(latents, channels, &what)
}

/// One request of the run, with the prompt-file line it came from (0 for `--prompt`).
struct LineRequest {
    line: usize,
    request: Request,
}

/// The requests of a run, in order, with the lines that could not become one.
fn requests(
    args: &GenerateArgs,
    engine: &Engine,
    base_seed: u64,
    pictures: &Img2ImgInputs,
) -> Result<(String, Vec<Result<LineRequest, LineError>>)> {
    // Prompt-file pictures and LoRAs are relative to the prompt file, each read once.
    let folder = args
        .prompts
        .prompts
        .as_deref()
        .filter(|p| *p != Path::new("-"))
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut read_images: HashMap<PathBuf, Result<Img2ImgInputs, String>> = HashMap::new();
    let mut line_pictures = |entry: &PromptEntry| -> Result<Img2ImgInputs, String> {
        let o = &entry.overrides;
        let mut inputs = pictures.clone();
        for (key, value) in [("init_image", &o.init_image), ("mask", &o.mask)] {
            let Some(value) = value else { continue };
            let path = folder.join(value);
            let read = read_images
                .entry(path.clone())
                .or_insert_with(|| {
                    let mut one = Img2ImgInputs::default();
                    let result = if key == "mask" {
                        read_mask(&path).map(|m| one.mask = Some(m))
                    } else {
                        read_init_image(&path).map(|i| one.init_image = Some(i))
                    };
                    result.map(|()| one).map_err(|e| format!("\"{key}\": {e:#}"))
                })
                .clone()?;
            if key == "mask" {
                inputs.mask = read.mask;
            } else {
                inputs.init_image = read.init_image;
            }
        }
        Ok(inputs)
    };
    // A line's `loras` replace --lora's set; each distinct list is read and checked once.
    let mut read_sets: HashMap<Vec<String>, Result<Arc<Loras>, String>> = HashMap::new();
    let mut line_loras = |entry: &PromptEntry| -> Result<Option<Arc<Loras>>, String> {
        let Some(list) = &entry.overrides.loras else {
            return Ok(None);
        };
        read_sets
            .entry(list.clone())
            .or_insert_with(|| {
                let specs = list
                    .iter()
                    .map(|item| {
                        let spec: LoraSpec = item.parse()?;
                        Ok(LoraSpec {
                            path: folder.join(&spec.path),
                            ..spec
                        })
                    })
                    .collect::<Result<Vec<_>, String>>()?;
                engine.open_loras(&specs).map_err(|e| format!("{e:#}"))
            })
            .clone()
            .map(Some)
            .map_err(|e| format!("\"loras\": {e}"))
    };
    let mut base = |entry: &PromptEntry| -> Result<LineRequest, LineError> {
        let o: &LineOverrides = &entry.overrides;
        let mut defaults = base_request(&entry.prompt, &args.prompts, &args.sampler, &args.size);
        let line_error = |message| LineError {
            line: entry.line,
            index: entry.index,
            message,
        };
        let inputs = line_pictures(entry).map_err(line_error)?;
        let loras = line_loras(entry).map_err(line_error)?;
        args.img2img.apply(&inputs, &mut defaults);
        let request = Request {
            strength: o.strength.or(defaults.strength),
            negative_prompt: o.negative_prompt.clone().unwrap_or(defaults.negative_prompt.clone()),
            seed: o.seed.or(args.seed).unwrap_or(base_seed),
            steps: o.steps.unwrap_or(defaults.steps),
            guidance: o.guidance.unwrap_or(defaults.guidance),
            guidance_rescale: o.guidance_rescale.unwrap_or(defaults.guidance_rescale),
            spacing: o.spacing.unwrap_or(defaults.spacing),
            zero_snr: o.zero_snr.or(defaults.zero_snr),
            sampler: o.sampler.unwrap_or(defaults.sampler),
            width: o.width.or(defaults.width),
            height: o.height.or(defaults.height),
            num_images: o.num_images.or(args.num_images),
            loras,
            ..defaults
        };
        let request = if args.baseline {
            request.into_baseline()
        } else {
            request
        };
        Ok(LineRequest {
            line: entry.line,
            request,
        })
    };
    let (label, entries) = match (&args.prompts.prompt, &args.prompts.prompts) {
        (Some(prompt), _) => {
            let entry = PromptEntry {
                line: 0,
                index: 0,
                prompt: prompt.clone(),
                overrides: LineOverrides::default(),
            };
            ("--prompt".to_string(), vec![Ok(entry)])
        }
        (None, Some(path)) => {
            let (label, entries) = prompts::read_prompt_file(path)?;
            // A file with nothing to draw is a mistake, not a run that made nothing; a shard
            // that gets no entries of a non-empty file is fine (checked before sharding).
            ensure!(
                !entries.is_empty(),
                "--prompts {label} has no prompts (only blank or # comment lines); add one prompt per line"
            );
            (label, entries)
        }
        (None, None) => bail!("give --prompt, --prompts or --from-image"),
    };
    let shard = match args.shard {
        Some(shard) => shard.resolve(args.shard_count)?,
        None => Shard::ALL,
    };
    let requests = entries
        .into_iter()
        .filter(|entry| {
            let index = match entry {
                Ok(e) => e.index,
                Err(e) => e.index,
            };
            shard.takes(index)
        })
        .map(|entry| entry.and_then(|e| base(&e)))
        .collect();
    Ok((label, requests))
}

/// The arguments recorded in a PNG made by sdfix, for --from-image.
fn args_from_image(args: &GenerateArgs, image: &Path) -> Result<GenerateArgs> {
    let text = png::read_png_text(image)?;
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
    let mut sampler = args.sampler.clone();
    sampler.schedule.steps = s.steps;
    sampler.schedule.spacing = Some(s.spacing.parse().map_err(anyhow::Error::msg)?);
    sampler.schedule.zero_snr = s.zero_snr;
    sampler.schedule.no_zero_snr = !s.zero_snr;
    sampler.schedule.steps_offset = Some(s.scheduler.steps_offset);
    sampler.guidance = s.guidance;
    sampler.guidance_rescale = s.guidance_rescale;
    sampler.prediction = Some(s.prediction.parse().map_err(anyhow::Error::msg)?);
    sampler.eta = s.eta;
    sampler.sampler = s
        .sampler
        .parse()
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("--from-image {}", image.display()))?;
    sampler.terminal_alpha_bar = s
        .terminal_alpha_bar
        .parse()
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("--from-image {}", image.display()))?;
    sampler.sigmas = s
        .sigmas
        .parse()
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("--from-image {}", image.display()))?;
    if !s.loras.is_empty() && args.model.lora.is_empty() {
        let names: Vec<&str> = s.loras.iter().map(|l| l.name.as_str()).collect();
        bail!(
            "--from-image {}: it was made with LoRA {}; pass them again with --lora FILE:WEIGHT",
            image.display(),
            names.join(", ")
        );
    }
    let img2img = match &s.img2img {
        None => Img2ImgArgs {
            init_image: None,
            strength: None,
            resize: Default::default(),
            mask: None,
            mask_blur: None,
            no_paste_back: false,
            vae_encode: Default::default(),
        },
        Some(record) => {
            let found = |flag: &str, name: &str, sha256: &str| -> Result<PathBuf> {
                let path = PathBuf::from(name);
                let bytes = std::fs::read(&path).with_context(|| {
                    format!(
                        "--from-image {}: it was made from {flag} {name}, which cannot be read from here; \
                         run from the folder it was made in, or put the picture back at that path",
                        image.display()
                    )
                })?;
                ensure!(
                    crate::engine::init_image::sha256_hex(&bytes) == sha256,
                    "--from-image {}: {flag} {name} is not the picture it was made from (its SHA-256 differs)",
                    image.display()
                );
                Ok(path)
            };
            let mask = match (&record.mask, &record.mask_sha256) {
                (Some(name), Some(sha256)) => Some(found("--mask", name, sha256)?),
                _ => None,
            };
            Img2ImgArgs {
                init_image: Some(found("--init-image", &record.init_image, &record.init_image_sha256)?),
                strength: Some(record.strength),
                resize: record.resize.parse().map_err(anyhow::Error::msg)?,
                mask,
                mask_blur: record.mask_blur,
                no_paste_back: !record.paste_back,
                vae_encode: record.vae_encode.parse().map_err(anyhow::Error::msg)?,
            }
        }
    };
    if img2img.init_image.is_some() {
        eprintln!(
            "re-running img2img from {} (the same picture: SHA-256 checked)",
            s.img2img.as_ref().map_or("", |r| r.init_image.as_str())
        );
    }
    Ok(GenerateArgs {
        img2img,
        model: ModelArgs {
            model: s.model,
            revision: s.revision,
            ..args.model.clone()
        },
        prompts: PromptArgs {
            prompt: Some(s.prompt),
            prompts: None,
            negative_prompt: s.negative_prompt,
        },
        from_image: None,
        sampler,
        seed: Some(s.seed),
        num_images: Some(1),
        batch_size: 1,
        size: SizeArgs {
            width: Some(s.width),
            height: Some(s.height),
        },
        latents: None,
        save_latents: args.save_latents,
        out_dir: args.out_dir.clone(),
        overwrite: args.overwrite,
        skip_existing: args.skip_existing,
        shard: None,
        shard_count: None,
        device: DeviceArgs {
            device: args
                .device
                .device
                .or(Some(s.device.parse::<DeviceChoice>().map_err(anyhow::Error::msg)?)),
            dtype: args
                .device
                .dtype
                .or(Some(device::parse_dtype(&s.dtype).map_err(anyhow::Error::msg)?)),
        },
        baseline: false,
        verbosity: args.verbosity.clone(),
    })
}

/// Writes each image as it arrives: the PNG, its latents when asked, its manifest line.
struct Writer<'a> {
    progress: &'a Progress,
    out_dir: &'a Path,
    /// Per job: its prompt-file line and each image's path.
    lines: Vec<usize>,
    paths: Vec<Vec<PathBuf>>,
    save_latents: bool,
}

impl Observer for Writer<'_> {
    fn image(&mut self, image: GeneratedImage) -> Result<()> {
        let path = &self.paths[image.job][image.index];
        png::write_image(path, &image)?;
        if self.save_latents {
            png::write_latents(&png::latents_path(path), &image.latents)?;
        }
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        manifest::append(self.out_dir, &manifest::record(name, self.lines[image.job], &image)?)?;
        self.progress.image_done(&format!(
            "wrote {} (seed {}, {:.1} s)",
            path.display(),
            image.settings.seed,
            image.seconds
        ));
        Ok(())
    }

    fn step(&mut self, _: &StepInfo) {
        self.progress.step();
    }

    fn event(&mut self, event: &crate::engine::Event) {
        self.progress.report(event);
    }

    fn warn(&mut self, message: &str) {
        self.progress.warn(message);
    }
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
    let verbosity = args.verbosity.resolve();
    let model_arg = args.model.model.as_str();
    if DEMO_MODELS.contains(&model_arg) && verbosity != Verbosity::Quiet {
        eprintln!(
            "note: using the built-in 32x32 {model_arg} model; for real images pass --model \
             ByteDance/sd2.1-base-zsnr-laionaes5 (or another SD 2.x repo or folder)"
        );
    }
    let (device, dtype) = args.device.resolve()?;
    let mut engine = Engine::open_with(&args.model.resolve(Some(&args.sampler)), &device, dtype)?;
    if verbosity != Verbosity::Quiet {
        for note in engine.notes() {
            eprintln!("{note}");
        }
    }
    if verbosity == Verbosity::Verbose && !engine.leftover_keys().is_empty() {
        let keys = engine.leftover_keys();
        eprintln!(
            "{} checkpoint key(s) no rule reads (ignored): {}",
            keys.len(),
            keys.join(", ")
        );
    }
    let initial_latents = args
        .latents
        .as_deref()
        .map(|p| read_latents(p, engine.configs().vae.latent_channels))
        .transpose()?;

    let base_seed = args.seed.unwrap_or_else(|| u64::from(rand::random::<u32>()));
    let pictures = args.img2img.read()?;
    let (source, requests) = requests(args, &engine, base_seed, &pictures)?;
    let mut failed: Vec<String> = Vec::new();
    let mut jobs: Vec<Job> = Vec::new();
    let mut lines: Vec<usize> = Vec::new();
    let single = args.prompts.prompt.is_some();
    for request in requests {
        let line = match &request {
            Ok(r) => r.line,
            Err(e) => e.line,
        };
        let job = request.map_err(|e| anyhow::anyhow!(e.message)).and_then(|r| {
            engine.job(Request {
                latents: initial_latents.clone(),
                ..r.request
            })
        });
        match job {
            Ok(job) => {
                for warning in &job.warnings {
                    eprintln!("{warning}");
                }
                jobs.push(job);
                lines.push(line);
            }
            // A single --prompt has no other lines to go on with.
            Err(err) if single => return Err(err),
            Err(err) => {
                eprintln!("error: {source}:{line}: {err:#}");
                failed.push(format!("{source}:{line}"));
            }
        }
    }

    // Killed workers' temporaries would pile up in a folder that shards share.
    for path in png::remove_stale_temporaries(&args.out_dir)? {
        eprintln!("removed {}, left by a writer no longer running", path.display());
    }

    // Existing files: skipped, replaced, or an error before any work.
    let paths: Vec<Vec<PathBuf>> = jobs
        .iter()
        .zip(&lines)
        .map(|(job, &line)| {
            job.seeds
                .iter()
                .enumerate()
                .map(|(k, &seed)| args.out_dir.join(png::image_name(line, k, seed, &job.request.prompt)))
                .collect()
        })
        .collect();
    let mut skipped = 0;
    for (job, job_paths) in jobs.iter_mut().zip(&paths) {
        // Each path is looked up once: the check and the skip read the same answer.
        let existing: Vec<bool> = job_paths.iter().map(|p| p.exists()).collect();
        if let Some(k) = existing.iter().position(|&e| e) {
            ensure!(
                args.skip_existing || args.overwrite,
                "{} already exists; pass --overwrite to replace it, --skip-existing to keep it, or another --out-dir",
                job_paths[k].display()
            );
        }
        if args.skip_existing {
            let before = job.images.len();
            job.keep_images(|k| !existing[k]);
            skipped += before - job.images.len();
        }
    }
    if args.seed.is_none() && verbosity != Verbosity::Quiet {
        eprintln!("seed {base_seed} (pass --seed to choose)");
    }

    let total: usize = jobs.iter().map(|j| j.images.len()).sum();
    let progress = Progress::new(total, verbosity);
    let written = if total == 0 {
        0
    } else {
        std::fs::create_dir_all(&args.out_dir)
            .with_context(|| format!("cannot create --out-dir {}", args.out_dir.display()))?;
        let mut writer = Writer {
            progress: &progress,
            out_dir: &args.out_dir,
            lines,
            paths,
            save_latents: args.save_latents,
        };
        engine.run(&jobs, args.batch_size, &mut writer)?
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
