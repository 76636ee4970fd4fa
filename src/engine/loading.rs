//! Loading and swapping the engine's modules as a run needs them: the text encoder (encoding a
//! run's texts ahead and freeing it, or keeping it for a server), the UNet and VAE once, the
//! UNet or text encoder again when a LoRA set differs from the loaded one (the old one freed
//! first), the VAE encoder on a run's first init picture; and the LoRA sets requests bring.

use std::sync::{Arc, PoisonError};
use std::time::Instant;

use anyhow::{Context, Result};

use super::batch::{texts_to_encode, Item, PromptEmbeddings, ENCODE_AHEAD_TEXTS};
use super::execute::{run_batch, Modules};
use super::observer::{Event, Interrupted, Observer};
use super::record::RecordContext;
use super::{Engine, Job};
use crate::device;
use crate::kernels::host_memory;
use crate::model::stable_diffusion::StableDiffusion;
use crate::weights::loader::{load_model_denoiser, load_model_text_encoder, load_model_unet, load_model_vae_encoder};
use crate::weights::lora::{Component, LoraSpec, Loras, MergeKey};

/// The tensor names of the components LoRAs change.
pub(super) struct LoraTargets {
    pub(super) unet: std::collections::BTreeSet<String>,
    pub(super) text_encoder: std::collections::BTreeSet<String>,
    /// Empty for a model without SDXL's second text encoder.
    pub(super) text_encoder_2: std::collections::BTreeSet<String>,
}

/// One LoRA set's share of a run.
pub(super) struct Segment<'a> {
    pub(super) jobs: &'a [Job],
    pub(super) batches: &'a [Vec<Item>],
    pub(super) loras: &'a Loras,
    /// The run's first set (which always reports [`Event::Loaded`]).
    pub(super) first: bool,
    /// The run's last set: its last batch may free the UNet before decoding
    /// ([`Engine::release_unet_when_done`]).
    pub(super) last: bool,
}

impl Engine {
    /// Reads the LoRA set `specs` names for [`Request::loras`] (each file once per engine) and
    /// checks that every module matches a layer of this model; nothing is merged yet.
    ///
    /// [`Request::loras`]: super::Request::loras
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
    pub(super) fn check_loras(&self, loras: &Loras) -> Result<()> {
        let components = [Component::Unet, Component::TextEncoder, Component::TextEncoder2];
        if components.iter().all(|&c| loras.merge_key(c).is_empty()) {
            return Ok(());
        }
        let targets = match self.lora_targets.get() {
            Some(targets) => targets,
            None => {
                let targets = LoraTargets {
                    unet: self.source.tensor_names("unet", self.dtype)?,
                    text_encoder: self.source.tensor_names("text_encoder", self.dtype)?,
                    text_encoder_2: match self.configs.text_encoder_2 {
                        Some(_) => self.source.tensor_names("text_encoder_2", self.dtype)?,
                        None => Default::default(),
                    },
                };
                self.lora_targets.get_or_init(|| targets)
            }
        };
        loras.check(Component::Unet, &targets.unet)?;
        loras.check(Component::TextEncoder, &targets.text_encoder)?;
        loras.check(Component::TextEncoder2, &targets.text_encoder_2)
    }

    /// The LoRA set `job` is made with.
    pub(super) fn loras_of<'a>(&'a self, job: &'a Job) -> &'a Arc<Loras> {
        job.request.loras.as_ref().unwrap_or(&self.loras)
    }

    /// The batches of one LoRA set: its text encoder and UNet loaded when the ones in memory were
    /// merged with other LoRAs (freed first), its texts encoded, then each batch.
    pub(super) fn run_segment(
        &mut self,
        part: &Segment,
        prompts: &mut Option<(MergeKey, PromptEmbeddings)>,
        observer: &mut dyn Observer,
    ) -> Result<usize> {
        let (jobs, batches, loras) = (part.jobs, part.batches, part.loras);
        let text_key = loras.text_merge_key();
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
        let reusable = |model: &StableDiffusion| self.unet_key == unet_key && model.has_unet();
        loaded |= !self.denoiser.as_ref().is_some_and(reusable);
        self.denoiser = match self.denoiser.take() {
            Some(model) if reusable(&model) => Some(model),
            Some(model) => {
                // The old UNet is freed before the new one loads: two are never resident.
                let (vae, dtype, vae_dtype, device) = model.into_vae();
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
        if self.encoder.is_none() && batches.iter().flatten().any(|item| jobs[item.job].encodes_pictures()) {
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
        let mut made = 0;
        for (n, batch) in batches.iter().enumerate() {
            if observer.interrupted() {
                return Err(Interrupted.into());
            }
            let modules = Modules {
                model,
                encoder: self.encoder.as_ref(),
                release_unet_when_done: self.release_unet_when_done && part.last && n + 1 == batches.len(),
            };
            made += run_batch(&modules, jobs, batch, prompts, &record, observer)?;
        }
        Ok(made)
    }
}
