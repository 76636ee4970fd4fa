//! The engine: one model, opened once, turning requests into images in memory. Every front-end
//! (`generate`, `ablate`, `serve`, a library user) goes through it; it writes no files.
//!
//! - [`Engine::open`] reads the model's configs once and checks nothing else is needed to start.
//! - [`Engine::job`] resolves a [`Request`] (the one settings type; every other source of
//!   settings is an [`Overrides`] applied onto one) into a [`Job`], with every check on user input
//!   ([`request`]), before any weight is read; a refusal is a [`RequestError`] naming the setting
//!   ([`field`]), which each front end words its own way.
//! - [`Engine::run`] groups the jobs' images into UNet batches by a typed key ([`batch`]), encodes
//!   each distinct prompt once, loads the modules on first use (`loading`), runs each batch
//!   (`execute`, the [`pipeline`] inside) and hands each finished image to an [`Observer`] as soon
//!   as it is decoded; [`Engine::generate`] collects them instead. What each image records is in
//!   [`record`].
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
//! Live previews of the denoising ([`preview`]) are drawn by a [`preview::Previewer`] that a
//! front-end's [`Observer`] calls from its step hook; the engine only builds it for the model.
//!
//! [`pipeline`]: crate::pipeline

pub mod batch;
mod execute;
pub mod field;
pub mod hires;
pub mod hires_pass;
pub mod init_image;
mod loading;
pub mod micro;
mod observer;
pub mod overrides;
pub mod preview;
pub mod record;
pub mod request;

use std::sync::{Arc, Mutex, OnceLock};

use anyhow::Result;
use candle_core::{DType, Device};

use self::batch::{plan_batches_in_sets, PromptEmbeddings};
pub use self::field::{Field, RequestError, Warning, Words};
use self::loading::{LoraTargets, Segment};
use self::observer::Collect;
pub use self::observer::{Event, GeneratedImage, Interrupted, Observer};
pub use self::overrides::Overrides;
pub use self::record::ImageRecord;
pub use self::request::{Job, Request};
use crate::device;
use crate::kernels::host_memory;
use crate::model::stable_diffusion::{StableDiffusion, TextEncoder};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::vae::VaeEncoder;
use crate::sampling::Prediction;
use crate::weights::files::{with_model_context, ModelLocation};
use crate::weights::loader::{ModelConfigs, ModelSource};
use crate::weights::lora::{Component, LoraCache, LoraSpec, Loras, MergeKey};
use crate::weights::single_file::detect::Detection;
use crate::weights::single_file::SingleFileOptions;

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
    /// `--vae DIR|FILE`: another VAE than the model's.
    pub vae: Option<std::path::PathBuf>,
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
    /// [`Engine::release_unet_when_done`].
    release_unet_when_done: bool,
    /// The (first) CLIP tokenizer, read on first need by [`Engine::tokenizer`].
    tokenizer: OnceLock<ClipTokenizer>,
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
    /// settled here ([`crate::weights::single_file::detect`]; for unmarked SD 2.x files that runs the UNet
    /// once) and its hash computed or taken from the cache.
    pub fn open_with(options: &ModelOptions, device: &Device, dtype: DType) -> Result<Self> {
        device::check_dtype(device, dtype)?;
        let model = options.model.as_str();
        let location = ModelLocation::parse(model, options.revision.as_deref())?;
        let source =
            ModelSource::open(location.clone(), &options.single_file).map_err(|err| with_model_context(err, model))?;
        let mut configs = source.configs().map_err(|err| with_model_context(err, model))?;
        let mut notes = source.describe();
        if let Some(vae) = &options.vae {
            configs.use_vae(vae, dtype)?;
            notes.push(format!("VAE: {} (--vae)", vae.display()));
        }
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
            release_unet_when_done: false,
            tokenizer: OnceLock::new(),
        };
        engine.check_loras(&engine.loras)?;
        Ok(engine)
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

    /// Frees the UNet after a run's last denoising step, before its last VAE decode: for a caller
    /// that runs once (the CLI's `generate`), so that the decode's activations come on top of the
    /// VAE alone, not of the UNet's weights too (SDXL: 10.3 GB of f32 weights, and a 1024 px
    /// decode's activations of several GB). Off by default: a later run reloads the UNet.
    /// Earlier batches of the run still decode beside it.
    pub fn release_unet_when_done(&mut self, release: bool) {
        self.release_unet_when_done = release;
    }

    /// What the user should know about the model as opened (a single file's family, its
    /// prediction type and where that came from).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// What the model predicts and whether it was trained with zero terminal SNR, each with where
    /// it was read or detected ([`ModelSource::detection`]): what `sdfix probe` reports.
    pub fn detection(&self) -> Result<Detection> {
        self.source.detection(&self.configs.scheduler)
    }

    /// Keys of a single file that nothing read and no rule ignores.
    pub fn leftover_keys(&self) -> &[String] {
        self.source.leftover_keys()
    }

    pub fn configs(&self) -> &ModelConfigs {
        &self.configs
    }

    /// A1111's short hash of a single-file checkpoint (`None` for folders and hub repos).
    pub fn model_hash(&self) -> Option<&str> {
        self.model_hash.as_deref()
    }

    /// What the model predicts under `requested` (a request's `prediction`, else the config's),
    /// and whether zero terminal SNR can be sampled with it ([`request::zero_snr_applies`]).
    pub fn prediction(&self, requested: Option<Prediction>) -> Result<(Prediction, bool), RequestError> {
        let prediction = request::model_prediction(requested, &self.configs.scheduler, &self.configs.scheduler_path)?;
        Ok((prediction, request::zero_snr_applies(prediction)))
    }

    /// The model's (first) CLIP tokenizer, read once and kept: what a token counter asks for on
    /// every keystroke (the server's `POST /sdfix/v1/prompt`). No weight is read.
    pub fn tokenizer(&self) -> Result<&ClipTokenizer> {
        if let Some(tokenizer) = self.tokenizer.get() {
            return Ok(tokenizer);
        }
        let tokenizer = self
            .source
            .tokenizer()
            .map_err(|err| with_model_context(err, &self.model))?;
        Ok(self.tokenizer.get_or_init(|| tokenizer))
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

    /// Resolves and checks one request against this model (its own LoRAs too); an error names
    /// the setting at fault, for the caller to word ([`RequestError::render`]).
    pub fn job(&self, request: Request) -> Result<Job, RequestError> {
        if let Some(loras) = &request.loras {
            self.check_loras(loras)
                .map_err(|e| RequestError::new(Field::Loras, format!("{e:#}")))?;
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
                let key = (loras.merge_key(Component::Unet), loras.text_merge_key());
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
        let segments = batches.chunk_by(|a, b| sets[a[0].job] == sets[b[0].job]).count();
        for (n, segment) in batches.chunk_by(|a, b| sets[a[0].job] == sets[b[0].job]).enumerate() {
            let loras = self.loras_of(&jobs[segment[0][0].job]).clone();
            let part = Segment {
                jobs,
                batches: segment,
                loras: &loras,
                first: n == 0,
                last: n + 1 == segments,
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::StepInfo;

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
    fn a_unet_released_when_done_makes_the_same_images_and_is_reloaded_by_the_next_run() {
        let open = || Engine::open("demo", None, &Device::Cpu, DType::F32).unwrap();
        let request = |prompt: &str| Request {
            steps: 4,
            num_images: Some(2),
            ..Request::new(prompt)
        };
        let rgb = |images: Vec<GeneratedImage>| images.into_iter().map(|i| i.rgb).collect::<Vec<_>>();
        let mut kept = open();
        let jobs = [kept.job(request("a")).unwrap(), kept.job(request("b")).unwrap()];
        let expected = rgb(kept.generate(&jobs).unwrap());
        assert!(kept.denoiser.as_ref().unwrap().has_unet());
        let mut released = open();
        released.release_unet_when_done(true);
        // Batches of one: three batches decode beside the UNet, the last one without it.
        let mut collect = Collect::default();
        released.run(&jobs, 1, &mut collect).unwrap();
        assert_eq!(rgb(collect.0), expected);
        assert!(!released.denoiser.as_ref().unwrap().has_unet());
        // The next run loads it again.
        assert_eq!(rgb(released.generate(&jobs).unwrap()), expected);
        assert!(!released.denoiser.as_ref().unwrap().has_unet());
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
