//! The engine: one model, opened once, turning requests into images in memory. Every front-end
//! (`generate`, `ablate`, a library user, later a server) goes through it; it writes no files.
//!
//! - [`Engine::open`] reads the model's configs once and checks nothing else is needed to start.
//! - [`Engine::job`] resolves a [`Request`] into a [`Job`], with every check on user input
//!   ([`request`]), before any weight is read.
//! - [`Engine::run`] groups the jobs' images into UNet batches by settings ([`batch`]), encodes each
//!   distinct prompt once, loads the modules on first use, runs the [`pipeline`] per batch and
//!   hands each finished image to an [`Observer`] as soon as it is decoded; [`Engine::generate`]
//!   collects them instead.
//!
//! Modules are loaded lazily and kept: the text encoder first, freed again before the UNet loads
//! when a run's texts can all be encoded ahead (its weights are then never resident beside the
//! UNet's) unless [`Engine::keep_text_encoder`] asks to keep it for later runs (a server); the
//! UNet and VAE once, for every later run of the same engine.
//!
//! LoRAs are merged into the weights as they load: the engine's set (`--lora`) unless a request
//! brings its own ([`Request::loras`], a prompt-file line's `loras`). A run makes its images set
//! by set (file names do not depend on the order), and a set whose merged UNet or text encoder
//! differs from the loaded one reloads that part from the source, the old one freed first: the
//! weights are then exactly those of an engine opened with that set (nothing is subtracted).
//!
//! [`pipeline`]: crate::pipeline

pub mod batch;
pub mod init_image;
pub mod request;
pub mod settings;

use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

use self::batch::{plan_batches_in_sets, texts_to_encode, Item, PromptEmbeddings, ENCODE_AHEAD_TEXTS};
use self::request::RecordContext;
pub use self::request::{Job, Request};
pub use self::settings::ImageSettings;
use crate::device;
use crate::kernels::host_memory;
use crate::model::stable_diffusion::{StableDiffusion, TextEncoder};
use crate::model::vae::VaeEncoder;
use crate::pipeline::Inpainting;
use crate::pipeline::{self, BatchInput, StepInfo};
use crate::sampling::noise::ImageNoise;
use crate::weights::files::{with_model_context, ModelLocation};
use crate::weights::loader::{
    load_model_denoiser, load_model_text_encoder, load_model_unet, load_model_vae_encoder, ModelConfigs, ModelSource,
};
use crate::weights::lora::{Component, LoraCache, LoraSpec, Loras, MergeKey};
use crate::weights::single_file::SingleFileOptions;

/// One finished image, with everything known about how it was made.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    /// Which job (index into the slice given to [`Engine::run`]) and which of its images.
    pub job: usize,
    pub index: usize,
    pub width: usize,
    pub height: usize,
    /// Row-major 8-bit RGB, `width * height * 3` bytes.
    pub rgb: Vec<u8>,
    /// The settings to record in the image (and to make it again).
    pub settings: ImageSettings,
    /// The final latents, (c, h, w) f32 on the CPU, before the VAE and not divided by its
    /// scaling factor.
    pub latents: Tensor,
    /// The mean of the image's initial latents (what stock SD's brightness follows).
    pub initial_noise_mean: f64,
    /// Wall time per image of its batch (load excluded), in seconds.
    pub seconds: f64,
}

/// What a run reports besides its images.
#[derive(Debug, Clone)]
pub enum Event {
    /// The text encoder encoded `texts` distinct texts ahead of the UNet and was freed (unless
    /// [`Engine::keep_text_encoder`] keeps it).
    EncodedAhead { texts: usize, seconds: f64 },
    /// The UNet and VAE are loaded (`seconds` includes the text encoder's load).
    Loaded {
        location: String,
        seconds: f64,
        dtype: DType,
        device: String,
    },
    /// A batch of `images` starts its `steps` denoising steps.
    BatchStarted { images: usize, steps: usize },
    /// A batch is done: seconds in text embedding lookup, the UNet loop and the VAE.
    BatchDone {
        images: usize,
        text_seconds: f64,
        unet_seconds: f64,
        vae_seconds: f64,
    },
}

/// Watches a run: every method but [`Observer::image`] has a default that ignores it.
pub trait Observer {
    /// A finished image; an error stops the run.
    fn image(&mut self, image: GeneratedImage) -> Result<()>;
    /// After each denoising step, with the latents and the x0 estimate.
    fn step(&mut self, _step: &StepInfo) {}
    fn event(&mut self, _event: &Event) {}
    /// Something the user should see (a prompt past the token limit).
    fn warn(&mut self, _message: &str) {}
    /// Asked after every denoising step and before every batch: `true` stops the run there,
    /// and [`Engine::run`] fails with [`Interrupted`] (the images already handed over stay
    /// made). A server's `/interrupt` and a client that hung up stop a run this way; a step
    /// hook cannot, since it returns nothing.
    fn interrupted(&mut self) -> bool {
        false
    }
}

/// The error of a run that its [`Observer::interrupted`] stopped; find it with
/// `err.is::<Interrupted>()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// An observer that keeps every image.
#[derive(Default)]
struct Collect(Vec<GeneratedImage>);

impl Observer for Collect {
    fn image(&mut self, image: GeneratedImage) -> Result<()> {
        self.0.push(image);
        Ok(())
    }
}

/// What opens a model: `--model` and what goes with it.
#[derive(Debug, Clone, Default)]
pub struct ModelOptions {
    /// A diffusers folder, a hub repo id, a built-in demo name, or a single-file checkpoint.
    pub model: String,
    pub revision: Option<String>,
    /// `--config`, `--ema` and the prediction flags, for single files.
    pub single_file: SingleFileOptions,
    /// `--lora FILE[:WEIGHT]`, merged into the weights at load.
    pub loras: Vec<LoraSpec>,
}

impl ModelOptions {
    pub fn new(model: &str, revision: Option<&str>) -> Self {
        Self {
            model: model.to_string(),
            revision: revision.map(str::to_string),
            ..Self::default()
        }
    }
}

/// A model opened for generation.
pub struct Engine {
    source: ModelSource,
    location: ModelLocation,
    /// `--model` as given (recorded in images).
    model: String,
    revision: Option<String>,
    /// A1111's short hash of a single-file checkpoint (`Model hash:`).
    model_hash: Option<String>,
    /// `--lora`: the set of every request that brings none.
    loras: Arc<Loras>,
    /// The LoRA files requests' own sets named, each read once.
    lora_cache: Mutex<LoraCache>,
    /// The tensors LoRA modules must match, read from the headers on first need.
    lora_targets: OnceLock<LoraTargets>,
    configs: ModelConfigs,
    device: Device,
    dtype: DType,
    denoiser: Option<StableDiffusion>,
    /// The LoRAs merged into the loaded UNet.
    unet_key: MergeKey,
    notes: Vec<String>,
    /// The VAE encoder, loaded by the first run with an init picture.
    encoder: Option<VaeEncoder>,
    /// The text encoder kept between runs ([`Engine::keep_text_encoder`]), with its LoRAs.
    text_encoder: Option<(MergeKey, TextEncoder)>,
    keep_text_encoder: bool,
}

/// The tensor names of the components LoRAs change.
struct LoraTargets {
    unet: std::collections::BTreeSet<String>,
    text_encoder: std::collections::BTreeSet<String>,
}

/// Hands the memory that finished runs freed back to the OS, for a long-lived caller with nothing
/// to do (the server's worker once its queue is empty): kept, it holds the last run's peak for as
/// long as the process idles (`host_memory`: freed memory is kept for reuse until a phase ends).
/// The next run's first allocations then cost page faults again.
pub fn release_idle_memory() {
    host_memory::release_freed();
}

impl Engine {
    /// Opens `model` (a diffusers folder, a hub repo id, a built-in demo name or a single-file
    /// checkpoint) at `revision` for `device` and `dtype`: its configs are read and checked; no
    /// weight is read yet.
    pub fn open(model: &str, revision: Option<&str>, device: &Device, dtype: DType) -> Result<Self> {
        Self::open_with(&ModelOptions::new(model, revision), device, dtype)
    }

    /// [`Engine::open`] with single-file options and LoRAs. A single file's prediction type is
    /// settled here ([`crate::weights::detect`]; for unmarked SD 2.x files that runs the UNet
    /// once) and its hash computed or taken from the cache.
    pub fn open_with(options: &ModelOptions, device: &Device, dtype: DType) -> Result<Self> {
        device::check_dtype(device, dtype)?;
        let model = options.model.as_str();
        let location = ModelLocation::parse(model, options.revision.as_deref())?;
        let source =
            ModelSource::open(location.clone(), &options.single_file).map_err(|err| with_model_context(err, model))?;
        let configs = source.configs().map_err(|err| with_model_context(err, model))?;
        let mut notes = source.describe();
        let model_hash = match &location {
            ModelLocation::File(path) => {
                let (digest, computed) = crate::weights::hash::cached_sha256(path)?;
                if computed {
                    notes.push(format!("hashed {} once (cached for later runs)", path.display()));
                }
                Some(digest[..crate::weights::hash::MODEL_HASH_DIGITS].to_string())
            }
            _ => None,
        };
        let mut lora_cache = LoraCache::default();
        let loras = Arc::new(lora_cache.open(&options.loras)?);
        let engine = Self {
            source,
            location,
            model: model.to_string(),
            revision: options.revision.clone(),
            model_hash,
            loras,
            lora_cache: Mutex::new(lora_cache),
            lora_targets: OnceLock::new(),
            configs,
            device: device.clone(),
            dtype,
            denoiser: None,
            unet_key: MergeKey::default(),
            notes,
            encoder: None,
            text_encoder: None,
            keep_text_encoder: false,
        };
        engine.check_loras(&engine.loras)?;
        Ok(engine)
    }

    /// Reads the LoRA set `specs` names for [`Request::loras`] (each file once per engine) and
    /// checks that every module matches a layer of this model; nothing is merged yet.
    pub fn open_loras(&self, specs: &[LoraSpec]) -> Result<Arc<Loras>> {
        let loras = self
            .lora_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .open(specs)?;
        self.check_loras(&loras)?;
        Ok(Arc::new(loras))
    }

    /// Checks that `loras` fit this model (read from the weights' headers on first need).
    fn check_loras(&self, loras: &Loras) -> Result<()> {
        let components = [Component::Unet, Component::TextEncoder];
        if components.iter().all(|&c| loras.merge_key(c).is_empty()) {
            return Ok(());
        }
        let targets = match self.lora_targets.get() {
            Some(targets) => targets,
            None => {
                let targets = LoraTargets {
                    unet: self.source.tensor_names("unet", self.dtype)?,
                    text_encoder: self.source.tensor_names("text_encoder", self.dtype)?,
                };
                self.lora_targets.get_or_init(|| targets)
            }
        };
        loras.check(Component::Unet, &targets.unet)?;
        loras.check(Component::TextEncoder, &targets.text_encoder)
    }

    /// The LoRA set `job` is made with.
    fn loras_of<'a>(&'a self, job: &'a Job) -> &'a Arc<Loras> {
        job.request.loras.as_ref().unwrap_or(&self.loras)
    }

    /// Keeps the text encoder loaded between runs, beside the UNet. Off by default: one run
    /// (the CLI) encodes its texts ahead and frees the encoder before the UNet loads, so the two
    /// are never resident together. A server runs once per request, and reloading the encoder
    /// (1.4 GB in f32 for SD 2.x, with its tokenizer) each time would cost more than a small
    /// request's sampling.
    pub fn keep_text_encoder(&mut self, keep: bool) {
        self.keep_text_encoder = keep;
        if !keep {
            self.text_encoder = None;
        }
    }

    /// What the user should know about the model as opened (a single file's family, its
    /// prediction type and where that came from).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Keys of a single file that nothing read and no rule ignores.
    pub fn leftover_keys(&self) -> &[String] {
        self.source.leftover_keys()
    }

    pub fn configs(&self) -> &ModelConfigs {
        &self.configs
    }

    pub fn location(&self) -> &ModelLocation {
        &self.location
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Resolves and checks one request against this model (its own LoRAs too).
    pub fn job(&self, request: Request) -> Result<Job> {
        if let Some(loras) = &request.loras {
            self.check_loras(loras)?;
        }
        request::resolve(&self.configs, request)
    }

    /// Makes every image of `jobs` and returns them in the order they were made (batched by
    /// settings, so not always job order: each image names its job and index).
    pub fn generate(&mut self, jobs: &[Job]) -> Result<Vec<GeneratedImage>> {
        let mut collect = Collect::default();
        self.run(jobs, 1, &mut collect)?;
        Ok(collect.0)
    }

    /// Makes every image still to make of `jobs`, at most `batch_size` per UNet batch, handing
    /// each to `observer` as soon as it is decoded. Returns how many were made, or fails with
    /// [`Interrupted`] when the observer asks to stop. Jobs on different LoRA sets run set by
    /// set, in first-seen order.
    pub fn run(&mut self, jobs: &[Job], batch_size: usize, observer: &mut dyn Observer) -> Result<usize> {
        // Each job's set, numbered in first-seen order by what its weights depend on.
        let mut keys: Vec<(MergeKey, MergeKey)> = Vec::new();
        let sets: Vec<usize> = jobs
            .iter()
            .map(|job| {
                let loras = self.loras_of(job);
                let key = (
                    loras.merge_key(Component::Unet),
                    loras.merge_key(Component::TextEncoder),
                );
                keys.iter().position(|k| *k == key).unwrap_or_else(|| {
                    keys.push(key);
                    keys.len() - 1
                })
            })
            .collect();
        let batches = plan_batches_in_sets(jobs, &sets, batch_size);
        if batches.is_empty() {
            return Ok(0);
        }
        let mut prompts = self
            .text_encoder
            .take()
            .map(|(key, encoder)| (key, PromptEmbeddings::new(encoder)));
        let mut made = 0;
        let mut outcome = Ok(());
        for (n, segment) in batches.chunk_by(|a, b| sets[a[0].job] == sets[b[0].job]).enumerate() {
            let loras = self.loras_of(&jobs[segment[0][0].job]).clone();
            let part = Segment {
                jobs,
                batches: segment,
                loras: &loras,
                first: n == 0,
            };
            match self.run_segment(&part, &mut prompts, observer) {
                Ok(count) => made += count,
                Err(err) => {
                    outcome = Err(err);
                    break;
                }
            }
        }
        // Kept for the next run even when this one was interrupted.
        if self.keep_text_encoder {
            self.text_encoder = prompts.and_then(|(key, p)| p.encoder.map(|encoder| (key, encoder)));
        }
        outcome.map(|()| made)
    }

    /// The batches of one LoRA set: its text encoder and UNet loaded when the ones in memory were
    /// merged with other LoRAs (freed first), its texts encoded, then each batch.
    fn run_segment(
        &mut self,
        part: &Segment,
        prompts: &mut Option<(MergeKey, PromptEmbeddings)>,
        observer: &mut dyn Observer,
    ) -> Result<usize> {
        let (jobs, batches, loras) = (part.jobs, part.batches, part.loras);
        let text_key = loras.merge_key(Component::TextEncoder);
        if prompts.as_ref().is_some_and(|(key, _)| *key != text_key) {
            // Embeddings and encoder of other LoRAs: freed before anything loads.
            *prompts = None;
        }
        let texts = texts_to_encode(jobs, batches);
        let encoded = texts.len() <= ENCODE_AHEAD_TEXTS
            && prompts
                .as_ref()
                .is_some_and(|(_, p)| texts.iter().all(|text| p.has(text)));
        let mut load_seconds = 0.0;
        // Whether this set loaded anything (reported as [`Event::Loaded`], as is a run's first set).
        let mut loaded = false;
        if !encoded {
            let started = Instant::now();
            let encoder = match prompts.take().and_then(|(_, p)| p.encoder) {
                Some(encoder) => encoder,
                None => {
                    loaded = true;
                    load_model_text_encoder(&self.source, &self.configs, self.dtype, &self.device, loras)?
                }
            };
            load_seconds += started.elapsed().as_secs_f64();
            // A fresh cache holds every text encoded ahead (the cache empties itself when full).
            let mut fresh = PromptEmbeddings::new(encoder);
            let mut warn = |message: &str| observer.warn(message);
            if texts.len() <= ENCODE_AHEAD_TEXTS {
                let encode_started = Instant::now();
                for text in &texts {
                    fresh.get(text, &mut warn)?;
                }
                if !self.keep_text_encoder {
                    fresh.encoder = None;
                    // Its 1.4 GB (SD 2) is not what the UNet allocates: not kept resident.
                    host_memory::release_freed();
                }
                observer.event(&Event::EncodedAhead {
                    texts: texts.len(),
                    seconds: encode_started.elapsed().as_secs_f64(),
                });
            }
            *prompts = Some((text_key, fresh));
        }
        let unet_key = loras.merge_key(Component::Unet);
        let unet_started = Instant::now();
        loaded |= self.denoiser.is_none() || self.unet_key != unet_key;
        self.denoiser = match self.denoiser.take() {
            Some(model) if self.unet_key == unet_key => Some(model),
            Some(model) => {
                // The old UNet is freed before the new one loads: two are never resident.
                let StableDiffusion {
                    unet,
                    vae,
                    dtype,
                    vae_dtype,
                    device,
                } = model;
                drop(unet);
                let unet = load_model_unet(&self.source, &self.configs, self.dtype, &self.device, loras)?;
                Some(StableDiffusion::new(unet, vae, dtype, vae_dtype, &device))
            }
            None => Some(load_model_denoiser(
                &self.source,
                &self.configs,
                self.dtype,
                &self.device,
                loras,
            )?),
        };
        self.unet_key = unet_key;
        load_seconds += unet_started.elapsed().as_secs_f64();
        if self.encoder.is_none() && batches.iter().flatten().any(|item| jobs[item.job].init.is_some()) {
            loaded = true;
            let encoder_started = Instant::now();
            self.encoder = Some(load_model_vae_encoder(
                &self.source,
                &self.configs,
                self.dtype,
                &self.device,
            )?);
            load_seconds += encoder_started.elapsed().as_secs_f64();
        }
        if loaded {
            // The read buffers and re-laid copies the loads freed; a warm engine (the server's
            // next request) keeps what its last run freed, for this run's activations to reuse.
            host_memory::release_freed();
        }
        if loaded || part.first {
            observer.event(&Event::Loaded {
                location: self.location.to_string(),
                seconds: load_seconds,
                dtype: self.dtype,
                device: device::describe(&self.device),
            });
        }
        let model = self
            .denoiser
            .as_ref()
            .context("internal: the denoiser was not loaded")?;
        let (_, prompts) = prompts.as_mut().context("internal: no text embeddings")?;
        let dtype_name = device::dtype_name(self.dtype);
        let device_name = device::describe(&self.device);
        let record = RecordContext {
            configs: &self.configs,
            model: &self.model,
            revision: self.revision.as_deref(),
            model_hash: self.model_hash.as_deref(),
            default_loras: &self.loras,
            dtype: dtype_name,
            device: &device_name,
        };
        let modules = Modules {
            model,
            encoder: self.encoder.as_ref(),
        };
        let mut made = 0;
        for batch in batches {
            if observer.interrupted() {
                return Err(Interrupted.into());
            }
            made += run_batch(&modules, jobs, batch, prompts, &record, observer)?;
        }
        Ok(made)
    }
}

/// One LoRA set's share of a run.
struct Segment<'a> {
    jobs: &'a [Job],
    batches: &'a [Vec<Item>],
    loras: &'a Loras,
    /// The run's first set (which always reports [`Event::Loaded`]).
    first: bool,
}

/// The loaded networks a batch runs on.
struct Modules<'a> {
    model: &'a StableDiffusion,
    /// Loaded when a run has an init picture.
    encoder: Option<&'a VaeEncoder>,
}

/// What img2img adds to a batch: the start latents and, for inpainting, the mask and latents
/// the pipeline needs at each step.
struct Img2ImgBatch {
    latents: Tensor,
    mask: Option<Tensor>,
    image_latents: Option<Tensor>,
    masked_image_latents: Option<Tensor>,
}

/// The batch's init pictures, one row each: (b, 3, H, W) in [-1, 1] on `device`, with the
/// repainted pixels set to 0 when `masked` (an inpainting UNet's masked picture).
fn init_pictures(jobs: &[Job], batch: &[Item], masked: bool, device: &Device) -> Result<Tensor> {
    let rows = batch
        .iter()
        .map(|item| {
            let init = jobs[item.job]
                .init
                .as_ref()
                .context("internal: a batch mixes text to image and img2img")?;
            let (w, h) = init.image.dimensions();
            let keep = if masked {
                init.mask.as_ref().map(|m| &m.binary)
            } else {
                None
            };
            let planes = init_image::to_unit_planes(&init.image, keep);
            Ok(Tensor::from_vec(planes, (3, h as usize, w as usize), &Device::Cpu)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&rows, 0)?.to_device(device)?)
}

/// Encodes pictures to sampler-scale latents, f32: the posterior's mean, or a sample of it drawn
/// from each image's encode stream.
fn encode(
    modules: &Modules,
    pictures: &Tensor,
    mode: init_image::VaeEncodeMode,
    noise: &mut ImageNoise,
) -> Result<Tensor> {
    let encoder = modules.encoder.context("internal: the VAE encoder was not loaded")?;
    let dist = encoder.encode(&pictures.to_dtype(modules.model.vae_dtype)?)?;
    let sample = match mode {
        init_image::VaeEncodeMode::Mean => None,
        init_image::VaeEncodeMode::Sample => {
            let (_, c, h, w) = dist.mean.dims4()?;
            Some(
                noise
                    .sample_encode((c, h, w), dist.mean.device())?
                    .to_dtype(dist.mean.dtype())?,
            )
        }
    };
    Ok(dist.latents(sample.as_ref())?.to_dtype(DType::F32)?)
}

/// img2img's start: the init latents noised to the first step's level,
/// `sqrt(a) x0 + sqrt(1 - a) noise` (diffusers' `add_noise`; under zero SNR at strength 1, a = 0
/// and this is the noise itself). Inpainting at strength 1 starts from the noise alone, as
/// diffusers' inpainting pipeline does whatever the schedule.
fn img2img_batch(
    modules: &Modules,
    jobs: &[Job],
    batch: &[Item],
    noise_latents: &Tensor,
    noise: &mut ImageNoise,
) -> Result<Img2ImgBatch> {
    let first = &jobs[batch[0].job];
    let init = first.init.as_ref().context("internal: no init picture")?;
    let settings = &first.settings;
    let device = &modules.model.device;
    let mode = first.request.vae_encode;
    let (_, h, w) = first.latent_shape;
    let conditioned = modules.model.unet.spec().in_channels != first.latent_shape.0;
    let from_noise = init.mask.is_some() && init.strength == 1.0;
    let image_latents = if from_noise && conditioned {
        None
    } else {
        Some(encode(
            modules,
            &init_pictures(jobs, batch, false, device)?,
            mode,
            noise,
        )?)
    };
    let latents = match (&image_latents, from_noise) {
        (Some(x0), false) => {
            let a = settings.schedule.alpha_cumprod(0);
            ((x0 * a.sqrt())? + (noise_latents * (1.0 - a).sqrt())?)?
        }
        _ => noise_latents.clone(),
    };
    let mut img2img = Img2ImgBatch {
        latents,
        mask: None,
        image_latents,
        masked_image_latents: None,
    };
    if init.mask.is_some() {
        let factor = modules.model.vae.downscale_factor();
        let rows = batch
            .iter()
            .map(|item| {
                let mask = jobs[item.job]
                    .init
                    .as_ref()
                    .and_then(|i| i.mask.as_ref())
                    .context("internal: a batch mixes img2img and inpainting")?;
                Ok(Tensor::from_vec(
                    init_image::latent_mask(&mask.binary, factor),
                    (1, h, w),
                    &Device::Cpu,
                )?)
            })
            .collect::<Result<Vec<_>>>()?;
        img2img.mask = Some(Tensor::stack(&rows, 0)?.to_device(device)?);
        if conditioned {
            let masked = init_pictures(jobs, batch, true, device)?;
            img2img.masked_image_latents = Some(encode(modules, &masked, mode, noise)?);
        }
    }
    Ok(img2img)
}

/// One UNet batch: initial latents, embeddings, the pipeline, then each image to the observer.
fn run_batch(
    modules: &Modules,
    jobs: &[Job],
    batch: &[Item],
    prompts: &mut PromptEmbeddings,
    record: &RecordContext,
    observer: &mut dyn Observer,
) -> Result<usize> {
    let model = modules.model;
    let batch_started = Instant::now();
    let first = &jobs[batch[0].job];
    let settings = &first.settings;
    let (c, h, w) = first.latent_shape;
    let seeds: Vec<u64> = batch.iter().map(|i| jobs[i.job].seeds[i.image]).collect();
    let mut noise = ImageNoise::new(&seeds);
    // Jobs with latents of their own never share a batch with seeded ones (see `batch_key`).
    let noise_latents = if first.request.latents.is_some() {
        let rows = batch
            .iter()
            .map(|i| jobs[i.job].request.latents.as_ref().map(|l| l.get(i.image)))
            .collect::<Option<candle_core::Result<Vec<Tensor>>>>()
            .context("internal: a batch mixes seeded noise and --latents")??;
        Tensor::stack(&rows, 0)?.to_device(&model.device)?
    } else {
        noise.sample((c, h, w), &model.device)?
    };
    // Per image: the mean of its initial noise (what stock SD's brightness follows).
    let noise_means: Vec<f64> = noise_latents
        .flatten_from(1)?
        .mean(1)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    let text_started = Instant::now();
    let mut warn = |message: &str| observer.warn(message);
    let cond = Tensor::cat(
        &batch
            .iter()
            .map(|i| prompts.get(&jobs[i.job].request.prompt, &mut warn))
            .collect::<Result<Vec<_>>>()?,
        0,
    )?;
    let uncond = if settings.uses_cfg() {
        let rows = batch
            .iter()
            .map(|i| prompts.get(&jobs[i.job].request.negative_prompt, &mut warn))
            .collect::<Result<Vec<_>>>()?;
        Some(Tensor::cat(&rows, 0)?)
    } else {
        None
    };
    let text_seconds = text_started.elapsed().as_secs_f64();
    observer.event(&Event::BatchStarted {
        images: batch.len(),
        steps: settings.schedule.timesteps.len(),
    });
    let unet_started = Instant::now();
    // The last step's hook marks the end of the denoising loop; the VAE is the rest.
    let mut loop_done = unet_started;
    let img2img = match first.init {
        Some(_) => Some(img2img_batch(modules, jobs, batch, &noise_latents, &mut noise)?),
        None => None,
    };
    let inpainting = img2img
        .as_ref()
        .and_then(|i| match (&i.mask, &i.masked_image_latents, &i.image_latents) {
            (Some(mask), Some(masked_image_latents), _) => Some(Inpainting::Condition {
                mask,
                masked_image_latents,
            }),
            (Some(mask), None, Some(image_latents)) => Some(Inpainting::Blend {
                image_latents,
                mask,
                noise: &noise_latents,
            }),
            _ => None,
        });
    let input = BatchInput {
        latents: img2img
            .as_ref()
            .map_or_else(|| noise_latents.clone(), |i| i.latents.clone()),
        cond: &cond,
        uncond: uncond.as_ref(),
        settings,
        inpainting,
    };
    let (final_latents, images) = pipeline::run_batch(model, input, &mut noise, &mut |step| {
        observer.step(step);
        loop_done = Instant::now();
        if observer.interrupted() {
            return Err(Interrupted.into());
        }
        Ok(())
    })?;
    let unet_seconds = loop_done.duration_since(unet_started).as_secs_f64();
    let vae_seconds = loop_done.elapsed().as_secs_f64();
    observer.event(&Event::BatchDone {
        images: batch.len(),
        text_seconds,
        unet_seconds,
        vae_seconds,
    });
    let seconds_each = batch_started.elapsed().as_secs_f64() / batch.len() as f64;
    let final_latents = final_latents.to_device(&Device::Cpu)?;
    let factor = model.vae.downscale_factor();
    for (b, (item, mut rgb)) in batch.iter().zip(images).enumerate() {
        let job = &jobs[item.job];
        // Inpainting: the kept pixels back as they were (outside the blurred mask, byte-exact).
        if let Some(init) = &job.init {
            if let Some(weights) = init.mask.as_ref().and_then(|m| m.paste_weights.as_ref()) {
                init_image::paste_back(&mut rgb, &init.image, weights);
            }
        }
        observer.image(GeneratedImage {
            job: item.job,
            index: item.image,
            width: w * factor,
            height: h * factor,
            rgb,
            settings: record.image_settings(job, item.image),
            latents: final_latents.get(b)?,
            initial_noise_mean: noise_means[b],
            seconds: seconds_each,
        })?;
    }
    Ok(batch.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts steps and images, and asks to stop after `stop_after` steps.
    struct StopAfter {
        stop_after: usize,
        steps: usize,
        images: usize,
    }

    impl Observer for StopAfter {
        fn image(&mut self, _: GeneratedImage) -> Result<()> {
            self.images += 1;
            Ok(())
        }

        fn step(&mut self, _: &StepInfo) {
            self.steps += 1;
        }

        fn interrupted(&mut self) -> bool {
            self.steps >= self.stop_after
        }
    }

    #[test]
    fn an_observer_stops_a_run_at_the_next_step_and_the_engine_goes_on() {
        let mut engine = Engine::open("demo", None, &Device::Cpu, DType::F32).unwrap();
        let job = engine
            .job(Request {
                steps: 20,
                num_images: Some(2),
                ..Request::new("solid black background")
            })
            .unwrap();
        let mut observer = StopAfter {
            stop_after: 3,
            steps: 0,
            images: 0,
        };
        let err = engine.run(std::slice::from_ref(&job), 1, &mut observer).unwrap_err();
        assert!(err.is::<Interrupted>(), "{err:#}");
        assert_eq!((observer.steps, observer.images), (3, 0));
        // Asked before the first batch: no step at all.
        let mut observer = StopAfter {
            stop_after: 0,
            steps: 0,
            images: 0,
        };
        assert!(engine.run(std::slice::from_ref(&job), 1, &mut observer).is_err());
        assert_eq!(observer.steps, 0);
        assert_eq!(engine.generate(&[job]).unwrap().len(), 2);
    }

    #[test]
    fn a_kept_text_encoder_makes_the_same_images_run_after_run() {
        let open = || Engine::open("demo", None, &Device::Cpu, DType::F32).unwrap();
        let request = |prompt: &str| Request {
            steps: 4,
            ..Request::new(prompt)
        };
        let mut fresh = open();
        let jobs = [fresh.job(request("a")).unwrap(), fresh.job(request("b")).unwrap()];
        let expected: Vec<Vec<u8>> = fresh.generate(&jobs).unwrap().into_iter().map(|i| i.rgb).collect();
        let mut kept = open();
        kept.keep_text_encoder(true);
        for (job, expected) in jobs.iter().zip(&expected) {
            let image = kept.generate(std::slice::from_ref(job)).unwrap().remove(0);
            assert!(kept.text_encoder.is_some());
            assert_eq!(&image.rgb, expected);
        }
        kept.keep_text_encoder(false);
        assert!(kept.text_encoder.is_none());
    }
}
