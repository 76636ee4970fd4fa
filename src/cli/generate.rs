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
    at_least_one, base_request, DeviceArgs, HiresArgs, Img2ImgArgs, Img2ImgInputs, ModelArgs, PreviewArgs, PromptArgs,
    SamplerArgs, ScheduleFlags, SizeArgs, VerbosityArgs,
};
use super::progress::{Progress, Verbosity};
use super::prompts::{self, LineError, PromptEntry};
use crate::device::{self, DeviceChoice};
use crate::engine::init_image::{self, InitImage, MaskImage};
use crate::engine::overrides::InputReader;
use crate::engine::preview::Previewer;
use crate::engine::request::check_latents;
use crate::engine::{Engine, GeneratedImage, ImageRecord, Job, Observer, Overrides, Request, RequestError, Words};
use crate::output::metadata;
use crate::output::{manifest, png};
use crate::pipeline::StepInfo;
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
    #[arg(long, value_name = "IMAGE.png", conflicts_with_all = ["model", "revision", "latents", "hires_latents"])]
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

    #[command(flatten)]
    pub hires: HiresArgs,

    /// The hires pass's noise instead of seeded noise (with --prompt and a hires flag): a
    /// safetensors file with a tensor "latents" at the hires latent size, [C, H, W] or
    /// [B, C, H, W] (to reproduce another tool's noise).
    #[arg(long, value_name = "FILE", conflicts_with = "prompts", help_heading = "Hires fix")]
    pub hires_latents: Option<PathBuf>,

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

    /// Rewrite this PNG with a preview of the picture being drawn as sampling runs (atomically:
    /// a reader sees the previous preview or the next, never half of one); a batch is shown as a
    /// grid. See --preview-method, --preview-every, --taesd.
    #[arg(long, value_name = "FILE.png")]
    pub preview: Option<PathBuf>,

    #[command(flatten)]
    pub previews: PreviewArgs,

    #[command(flatten)]
    pub device: DeviceArgs,

    /// The original, flawed pipeline for side-by-side runs: leading timesteps, no zero-SNR
    /// rescale, no CFG rescale.
    #[arg(long, conflicts_with_all = ["spacing", "zero_snr", "no_zero_snr", "guidance_rescale"])]
    pub baseline: bool,

    #[command(flatten)]
    pub verbosity: VerbosityArgs,
}

/// Reads --latents (or --hires-latents, `flag`): [C, H, W] or [B, C, H, W], f32, on the CPU.
fn read_latents(flag: &str, path: &Path, channels: usize) -> Result<Tensor> {
    let what = format!("{flag} {}", path.display());
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu).with_context(|| what.clone())?;
    let latents = tensors
        .remove("latents")
        .with_context(|| format!("{what}: no tensor named \"latents\""))?;
    check_latents(latents, channels, &what)
}

/// Where the pictures that overrides name are read from: paths relative to `folder`, and for
/// `--from-image` checked against the hashes its PNG recorded.
struct PictureFiles<'a> {
    folder: PathBuf,
    /// `--from-image`: the PNG, and the SHA-256 of each picture it was made from, by name.
    recorded: Option<(&'a Path, HashMap<String, String>)>,
}

impl PictureFiles<'_> {
    /// The bytes of picture `name` (relative to the folder), checked against the PNG's record
    /// for `--from-image`.
    fn read(&self, name: &str) -> Result<(PathBuf, Vec<u8>)> {
        let path = self.folder.join(name);
        let bytes = std::fs::read(&path);
        if let Some((png, hashes)) = &self.recorded {
            let bytes = bytes.with_context(|| {
                format!(
                    "{name}: {} was made from it, but it cannot be read from here; run from the folder it was \
                     made in, or put the picture back at that path",
                    png.display()
                )
            })?;
            ensure!(
                hashes.get(name).is_some_and(|h| *h == init_image::sha256_hex(&bytes)),
                "{name} is not the picture {} was made from (its SHA-256 differs)",
                png.display()
            );
            return Ok((path, bytes));
        }
        let bytes = bytes.with_context(|| format!("{}: cannot read it", path.display()))?;
        Ok((path, bytes))
    }

    /// The picture `reference` names, decoded by `decode` once and kept in `cache` (an error
    /// too: a bad file named on many lines is read once).
    fn cached<P>(
        &self,
        cache: &mut HashMap<PathBuf, Result<Arc<P>, String>>,
        reference: &str,
        decode: impl FnOnce(&[u8], &str) -> Result<Arc<P>>,
    ) -> Result<Arc<P>> {
        let read = cache.entry(self.folder.join(reference)).or_insert_with(|| {
            self.read(reference)
                .and_then(|(path, bytes)| decode(&bytes, &path.display().to_string()))
                .map_err(|e| format!("{e:#}"))
        });
        read.clone().map_err(anyhow::Error::msg)
    }
}

/// Reads the pictures and LoRA sets that overrides name, each once.
struct FileInputs<'a> {
    files: PictureFiles<'a>,
    engine: &'a Engine,
    images: HashMap<PathBuf, Result<Arc<InitImage>, String>>,
    masks: HashMap<PathBuf, Result<Arc<MaskImage>, String>>,
    loras: HashMap<Vec<String>, Result<Arc<Loras>, String>>,
}

impl<'a> FileInputs<'a> {
    fn new(files: PictureFiles<'a>, engine: &'a Engine) -> Self {
        Self {
            files,
            engine,
            images: HashMap::new(),
            masks: HashMap::new(),
            loras: HashMap::new(),
        }
    }
}

impl InputReader for FileInputs<'_> {
    fn init_image(&mut self, reference: &str) -> Result<Arc<InitImage>> {
        self.files.cached(&mut self.images, reference, InitImage::decode)
    }

    fn mask(&mut self, reference: &str) -> Result<Arc<MaskImage>> {
        self.files.cached(&mut self.masks, reference, MaskImage::decode)
    }

    fn loras(&mut self, list: &[String]) -> Result<Arc<Loras>> {
        if !self.loras.contains_key(list) {
            let specs = list
                .iter()
                .map(|item| {
                    let spec: LoraSpec = item.parse().map_err(anyhow::Error::msg)?;
                    Ok(LoraSpec {
                        path: self.files.folder.join(&spec.path),
                        ..spec
                    })
                })
                .collect::<Result<Vec<_>>>();
            let opened = specs.and_then(|specs| self.engine.open_loras(&specs));
            self.loras.insert(list.to_vec(), opened.map_err(|e| format!("{e:#}")));
        }
        self.loras[list].clone().map_err(anyhow::Error::msg)
    }
}

/// One request of the run, with the prompt-file line it came from (0 for `--prompt`).
struct LineRequest {
    line: usize,
    request: Request,
    /// The keys the line gave (all of them for `--from-image`), to word its errors.
    keys: Vec<String>,
}

/// A request error in the words of where the setting came from: the line's key when the
/// prompt-file line (or the PNG of `--from-image`) gave it, the flag otherwise.
fn describe(err: &RequestError, entry_keys: &[String]) -> String {
    if entry_keys.iter().any(|k| k == err.field.key()) {
        err.render(Words::Keys)
    } else {
        err.render(Words::Flags)
    }
}

/// What `--from-image` takes from a PNG made by sdfix: its recorded settings as overrides of
/// the command line (so a flag given now, e.g. `--steps`, is replaced by the recorded value),
/// and the model, device and dtype it was made with.
struct FromImage {
    png: PathBuf,
    overrides: Overrides,
    record: ImageRecord,
}

impl FromImage {
    fn read(png_path: &Path, args: &GenerateArgs) -> Result<Self> {
        let label = png_path.display();
        let text = png::read_png_text(png_path)?;
        let json = text
            .get(metadata::SETTINGS_CHUNK)
            .with_context(|| format!("--from-image {label}: no sdfix settings in this PNG"))?;
        let record: ImageRecord =
            serde_json::from_str(json).with_context(|| format!("--from-image {label}: unreadable sdfix settings"))?;
        ensure!(
            !record.from_latents_file,
            "--from-image {label}: the image started from a --latents file; rerun it with that file"
        );
        if !record.loras.is_empty() && args.model.lora.is_empty() {
            let names: Vec<&str> = record.loras.iter().map(|l| l.name.as_str()).collect();
            bail!(
                "--from-image {label}: it was made with LoRA {}; pass them again with --lora FILE:WEIGHT",
                names.join(", ")
            );
        }
        let overrides = Overrides::from_record(&record)
            .map_err(|e| anyhow::anyhow!("--from-image {label}: {}", e.render(Words::Keys)))?;
        if let Some(img2img) = &record.img2img {
            eprintln!(
                "re-running img2img from {} (the same picture: SHA-256 checked)",
                img2img.init_image
            );
        }
        Ok(Self {
            png: png_path.to_path_buf(),
            overrides,
            record,
        })
    }

    /// The SHA-256 of each picture the image was made from, by recorded name.
    fn picture_hashes(&self) -> HashMap<String, String> {
        let mut hashes = HashMap::new();
        if let Some(img2img) = &self.record.img2img {
            hashes.insert(img2img.init_image.clone(), img2img.init_image_sha256.clone());
            if let (Some(name), Some(sha)) = (&img2img.mask, &img2img.mask_sha256) {
                hashes.insert(name.clone(), sha.clone());
            }
        }
        hashes
    }

    /// The model the image was made with, keeping the other model flags (`--lora`, `--config`).
    fn model(&self, args: &ModelArgs) -> ModelArgs {
        ModelArgs {
            model: self.record.model.clone(),
            revision: self.record.revision.clone(),
            ..args.clone()
        }
    }

    /// Its device and dtype, unless `--device` or `--dtype` says otherwise.
    fn device(&self, args: &DeviceArgs) -> Result<DeviceArgs> {
        Ok(DeviceArgs {
            device: match args.device {
                Some(d) => Some(d),
                None => Some(self.record.device.parse::<DeviceChoice>().map_err(anyhow::Error::msg)?),
            },
            dtype: match args.dtype {
                Some(d) => Some(d),
                None => Some(device::parse_dtype(&self.record.dtype).map_err(anyhow::Error::msg)?),
            },
        })
    }
}

/// The run's prompt entries: `--prompt`, the PNG of `--from-image`, or every line of
/// `--prompts` (shard taken), with the label errors are reported under.
fn entries(
    args: &GenerateArgs,
    from_image: Option<&FromImage>,
) -> Result<(String, Vec<Result<PromptEntry, LineError>>)> {
    let (label, entries) = match (&args.prompts.prompt, &args.prompts.prompts, from_image) {
        (_, _, Some(from)) => {
            let keys = crate::engine::Field::ALL.iter().map(|f| f.key().to_string()).collect();
            let entry = PromptEntry {
                line: 0,
                index: 0,
                prompt: from.record.prompt.clone(),
                overrides: from.overrides.clone(),
                keys,
            };
            (format!("--from-image {}", from.png.display()), vec![Ok(entry)])
        }
        (Some(prompt), _, None) => {
            let entry = PromptEntry {
                line: 0,
                index: 0,
                prompt: prompt.clone(),
                overrides: Overrides::default(),
                keys: Vec::new(),
            };
            ("--prompt".to_string(), vec![Ok(entry)])
        }
        (None, Some(path), None) => {
            let (label, entries) = prompts::read_prompt_file(path)?;
            // A file with nothing to draw is a mistake, not a run that made nothing; a shard
            // that gets no entries of a non-empty file is fine (checked before sharding).
            ensure!(
                !entries.is_empty(),
                "--prompts {label} has no prompts (only blank or # comment lines); add one prompt per line"
            );
            (label, entries)
        }
        (None, None, None) => bail!("give --prompt, --prompts or --from-image"),
    };
    let shard = match args.shard {
        Some(shard) => shard.resolve(args.shard_count)?,
        None => Shard::ALL,
    };
    let entries = entries
        .into_iter()
        .filter(|entry| {
            let index = match entry {
                Ok(e) => e.index,
                Err(e) => e.index,
            };
            shard.takes(index)
        })
        .collect();
    Ok((label, entries))
}

/// The request of `entry`: the command line's settings, then the entry's overrides on top.
fn entry_request(
    args: &GenerateArgs,
    entry: &PromptEntry,
    base_seed: u64,
    pictures: &Img2ImgInputs,
    inputs: &mut FileInputs,
) -> Result<Request, RequestError> {
    let mut request = Request {
        seed: args.seed.unwrap_or(base_seed),
        num_images: args.num_images,
        ..base_request(&entry.prompt, &args.prompts, &args.sampler, &args.size)
    };
    args.img2img.apply(pictures, &mut request);
    request.hires = args.hires.fix();
    if args.baseline {
        request = request.into_baseline();
    }
    entry.overrides.apply(&mut request, inputs)?;
    Ok(request)
}

/// Writes each image as it arrives: the PNG, its latents when asked, its manifest line.
struct Writer<'a> {
    progress: &'a Progress,
    out_dir: &'a Path,
    /// Per job: its prompt-file line and each image's path.
    lines: Vec<usize>,
    paths: Vec<Vec<PathBuf>>,
    save_latents: bool,
    /// `--preview`: the file and what draws it; `None` once a preview failed (warned once).
    preview: Option<(PathBuf, Previewer)>,
}

impl Writer<'_> {
    /// Rewrites the preview file when `step` is due for one. A failure is reported once and ends
    /// previews; the run goes on (the images are what was asked for).
    fn preview(&mut self, step: &StepInfo) {
        let Some((path, previewer)) = &self.preview else {
            return;
        };
        if !previewer.due(step) {
            return;
        }
        let written = previewer.render(step.x0).and_then(|image| {
            png::write_png(path, &image.rgb, image.width as u32, image.height as u32, &[])
                .with_context(|| format!("--preview {}", path.display()))
        });
        if let Err(err) = written {
            self.progress.warn(&format!("warning: no more previews: {err:#}"));
            self.preview = None;
        }
    }
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

    fn step(&mut self, step: &StepInfo) {
        self.progress.step();
        self.preview(step);
    }

    fn event(&mut self, event: &crate::engine::Event) {
        self.progress.report(event);
    }

    fn warn(&mut self, message: &str) {
        self.progress.warn(message);
    }
}

/// `--preview FILE.png`: a PNG path in a folder that exists, not a folder itself.
fn check_preview_path(path: &Path) -> Result<()> {
    let label = path.display();
    let is_png = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    ensure!(is_png, "--preview {label}: give a .png file name");
    ensure!(!path.is_dir(), "--preview {label} is a folder; give a .png file name");
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    ensure!(
        folder.is_dir(),
        "--preview {label}: no folder {}; create it or give another path",
        folder.display()
    );
    Ok(())
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    if args.preview.is_none() {
        if let Some(flag) = args.previews.given() {
            bail!("{flag} sets up previews; add --preview FILE.png");
        }
    }
    let from_image = args
        .from_image
        .as_deref()
        .map(|png| FromImage::read(png, args))
        .transpose()?;
    let model_args = match &from_image {
        Some(from) => from.model(&args.model),
        None => args.model.clone(),
    };
    let device_args = match &from_image {
        Some(from) => from.device(&args.device)?,
        None => args.device.clone(),
    };
    let verbosity = args.verbosity.resolve();
    let model_arg = model_args.model.as_str();
    if DEMO_MODELS.contains(&model_arg) && verbosity != Verbosity::Quiet {
        eprintln!(
            "note: using the built-in 32x32 {model_arg} model; for real images pass --model \
             ByteDance/sd2.1-base-zsnr-laionaes5 (or another SD 2.x repo or folder)"
        );
    }
    let (device, dtype) = device_args.resolve()?;
    // A PNG's recorded prediction and zero SNR settle a single file's detection as flags would.
    let sampler_args = match &from_image {
        Some(from) => SamplerArgs {
            prediction: from.overrides.prediction,
            schedule: ScheduleFlags {
                zero_snr: from.record.zero_snr,
                no_zero_snr: !from.record.zero_snr,
                ..args.sampler.schedule.clone()
            },
            ..args.sampler.clone()
        },
        None => args.sampler.clone(),
    };
    let mut engine = Engine::open_with(&model_args.resolve(Some(&sampler_args)), &device, dtype)?;
    // One run: the last batch decodes with the UNet freed.
    engine.release_unet_when_done(true);
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
    let preview = match &args.preview {
        Some(path) => {
            check_preview_path(path)?;
            let (previewer, warnings) = engine.previewer(&args.previews.resolve()?)?;
            for warning in warnings {
                eprintln!("{warning}");
            }
            Some((path.clone(), previewer))
        }
        None => None,
    };
    let initial_latents = args
        .latents
        .as_deref()
        .map(|p| read_latents("--latents", p, engine.configs().vae.latent_channels))
        .transpose()?;
    let hires_latents = args
        .hires_latents
        .as_deref()
        .map(|p| read_latents("--hires-latents", p, engine.configs().vae.latent_channels))
        .transpose()?;

    let base_seed = args.seed.unwrap_or_else(|| u64::from(rand::random::<u32>()));
    let pictures = args.img2img.read()?;
    let (source, entries) = entries(args, from_image.as_ref())?;
    // Prompt-file pictures and LoRAs are relative to the prompt file; --from-image's to here.
    let folder = args
        .prompts
        .prompts
        .as_deref()
        .filter(|p| *p != Path::new("-") && from_image.is_none())
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let files = PictureFiles {
        folder,
        recorded: from_image
            .as_ref()
            .map(|from| (from.png.as_path(), from.picture_hashes())),
    };
    let mut inputs = FileInputs::new(files, &engine);
    let mut failed: Vec<String> = Vec::new();
    let mut requests: Vec<LineRequest> = Vec::new();
    let single = args.prompts.prompt.is_some() || from_image.is_some();
    let mut fail = |line: usize, message: String| -> Result<()> {
        // A single --prompt has no other lines to go on with.
        if single {
            match &from_image {
                Some(_) => bail!("{source}: {message}"),
                None => bail!("{message}"),
            }
        }
        eprintln!("error: {source}:{line}: {message}");
        failed.push(format!("{source}:{line}"));
        Ok(())
    };
    for entry in entries {
        match entry {
            Err(e) => fail(e.line, e.message)?,
            Ok(entry) => match entry_request(args, &entry, base_seed, &pictures, &mut inputs) {
                Ok(request) => requests.push(LineRequest {
                    line: entry.line,
                    request: Request {
                        latents: initial_latents.clone(),
                        hires_latents: hires_latents.clone(),
                        ..request
                    },
                    keys: entry.keys,
                }),
                Err(err) => fail(entry.line, describe(&err, &entry.keys))?,
            },
        }
    }
    drop(inputs);
    let mut jobs: Vec<Job> = Vec::new();
    let mut lines: Vec<usize> = Vec::new();
    for LineRequest { line, request, keys } in requests {
        match engine.job(request) {
            Ok(job) => {
                for warning in &job.warnings {
                    eprintln!("{warning}");
                }
                jobs.push(job);
                lines.push(line);
            }
            Err(err) => fail(line, describe(&err, &keys))?,
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
            preview,
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
