//! Which images share a UNet batch, and the prompt-embedding cache that encodes each distinct text
//! once, ahead of the UNet when a run has few of them.

use std::collections::{HashMap, HashSet};

use anyhow::{Context, Result};
use candle_core::Tensor;

use super::request::Job;
use crate::model::stable_diffusion::TextEncoder;

/// Runs with at most this many distinct texts (prompts and negative prompts) encode them all
/// first and free the text encoder before the UNet loads: its weights (1.4 GB in f32 for SD 2.x)
/// are then never resident beside the UNet's. Longer prompt files keep it and encode as they go,
/// so that neither the embeddings (0.3 MB each in f32) nor the wait before the first image grow
/// with the file.
pub const ENCODE_AHEAD_TEXTS: usize = 64;

/// One image to make: which job, which of its images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Item {
    pub job: usize,
    pub image: usize,
}

/// Images that can share a UNet batch: same sampler, noise schedule (zero SNR and its terminal
/// alpha_bar), timesteps and noise levels (`--sigmas`), guidance, eta, prediction and size, and the same source of initial
/// latents (seeded noise or the request's own). Public so that a server can gather queued
/// requests that will share batches into one run.
pub fn batch_key(job: &Job) -> String {
    let s = &job.settings;
    format!(
        "{}|{:?}|{}|{:?}|{:?}|{}|{}|{}|{:?}|{:?}|{}",
        s.sampler,
        s.schedule.continuous,
        job.zero_snr,
        s.schedule.noise.alphas_cumprod.last(),
        s.schedule.timesteps,
        s.guidance,
        s.guidance_rescale,
        s.ddim.eta,
        s.ddim.prediction,
        job.latent_shape,
        job.request.latents.is_some()
    )
}

/// Every image still to make, grouped by settings in first-seen order, then cut into batches of at
/// most `batch_size`.
pub fn plan_batches(jobs: &[Job], batch_size: usize) -> Vec<Vec<Item>> {
    plan_batches_in_sets(jobs, &vec![0; jobs.len()], batch_size)
}

/// [`plan_batches`] for jobs on different model weights: `sets[j]` numbers job j's weights (its
/// LoRA set), and the batches come set by set, in set order, so that each set's weights are
/// loaded once however the jobs interleave.
pub fn plan_batches_in_sets(jobs: &[Job], sets: &[usize], batch_size: usize) -> Vec<Vec<Item>> {
    let mut groups: Vec<((usize, String), Vec<Item>)> = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        let key = (sets[j], batch_key(job));
        let items = job.images.iter().map(|&image| Item { job: j, image });
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, group)) => group.extend(items),
            None => groups.push((key, items.collect())),
        }
    }
    // Stable: within a set, settings keep their first-seen order.
    groups.sort_by_key(|((set, _), _)| *set);
    groups
        .iter()
        .flat_map(|(_, group)| group.chunks(batch_size.max(1)).map(<[Item]>::to_vec))
        .collect()
}

/// The texts the batches encode, each once, in order of use; counted only up to one past the
/// encode-ahead limit.
pub fn texts_to_encode<'a>(jobs: &'a [Job], batches: &[Vec<Item>]) -> Vec<&'a str> {
    let mut texts: Vec<&str> = Vec::new();
    let mut seen = HashSet::new();
    for item in batches.iter().flatten() {
        let job = &jobs[item.job];
        let negative = job.settings.uses_cfg().then_some(job.request.negative_prompt.as_str());
        for text in std::iter::once(job.request.prompt.as_str()).chain(negative) {
            if seen.insert(text) {
                texts.push(text);
                if texts.len() > ENCODE_AHEAD_TEXTS {
                    return texts;
                }
            }
        }
    }
    texts
}

/// Text embeddings by text, encoded on demand and cached; once the encoder is freed, only what
/// was encoded before.
pub struct PromptEmbeddings {
    pub encoder: Option<TextEncoder>,
    cache: HashMap<String, Tensor>,
}

impl PromptEmbeddings {
    pub fn new(encoder: TextEncoder) -> Self {
        Self {
            encoder: Some(encoder),
            cache: HashMap::new(),
        }
    }

    /// Whether `text` is encoded already.
    pub fn has(&self, text: &str) -> bool {
        self.cache.contains_key(text)
    }

    /// The embeddings of `text`, (1, tokens, dim); a text past the encoder's token limit is
    /// reported to `warn` when it is encoded.
    pub fn get(&mut self, text: &str, warn: &mut dyn FnMut(&str)) -> Result<Tensor> {
        if let Some(e) = self.cache.get(text) {
            return Ok(e.clone());
        }
        let encoder = self
            .encoder
            .as_ref()
            .with_context(|| format!("internal: {text:?} was not encoded before the text encoder was freed"))?;
        let dropped = encoder.tokenizer.truncated_tokens(text)?;
        if dropped > 0 {
            warn(&format!(
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
