//! Which images share a UNet batch, and the prompt-embedding cache that encodes each distinct text
//! once, ahead of the UNet when a run has few of them.

use std::collections::{HashMap, HashSet};

use anyhow::{Context, Result};

use super::hires::HiresUpscaler;
use super::init_image::VaeEncodeMode;
use super::request::{BatchMode, Job};
use crate::model::stable_diffusion::{PromptEncoding, PromptOptions, TextEncoder};
use crate::prompt::unsupported_warning;
use crate::sampling::{Prediction, Sampler};
use crate::schedule::Schedule;

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

/// What images must agree on to share a UNet batch: everything the batch's numbers depend on
/// beyond each image's own seed, prompt, picture and mask. Built from the one settings type
/// ([`BatchKey::of`]); a new setting that changes the numbers belongs here, and the compiler
/// points at the one place that builds it. Floats are kept as their bits (two settings batch
/// together only when exactly equal). Public so that a server gathers queued requests that will
/// share batches into one run.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BatchKey {
    mode: BatchMode,
    sampler: Sampler,
    prediction: Prediction,
    eta: u64,
    clip_sample_range: Option<u64>,
    guidance: u64,
    guidance_rescale: u64,
    /// Per step: the timestep, alpha_bar and the model's (fractional) timestep; then where the
    /// last step goes.
    steps: Vec<(usize, u64, u64)>,
    final_alpha_cumprod: u64,
    /// (channels, height, width) of one image's latents.
    latent_shape: (usize, usize, usize),
    /// The request's own initial latents instead of seeded noise.
    own_latents: bool,
    /// img2img: how the pictures' latents are taken, and the strength (inpainting at strength 1
    /// starts from the noise alone).
    vae_encode: Option<VaeEncodeMode>,
    strength: Option<u64>,
    /// `--vae-tiling`: the batch decodes (and encodes) once, tiled or not.
    vae_tiling: bool,
    /// The hires pass: its upscaler, sizes, crop and schedule, how a Lanczos picture is encoded
    /// again, and whether its noise is the request's own.
    hires: Option<HiresKey>,
}

/// What a batch's hires pass depends on (the guidance is the first pass's; its prompts are per
/// image).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct HiresKey {
    upscaler: HiresUpscaler,
    sampler: Sampler,
    upscale_to: (usize, usize),
    crop: (usize, usize),
    latent_shape: (usize, usize, usize),
    steps: Vec<(usize, u64, u64)>,
    final_alpha_cumprod: u64,
    vae_encode: VaeEncodeMode,
    own_latents: bool,
}

/// Per step of `schedule`: the timestep, alpha_bar and the model's (fractional) timestep.
fn step_values(schedule: &Schedule) -> Vec<(usize, u64, u64)> {
    (0..schedule.timesteps.len())
        .map(|i| {
            (
                schedule.timesteps[i],
                schedule.alpha_cumprod(i).to_bits(),
                schedule.model_timestep(i).to_bits(),
            )
        })
        .collect()
}

impl BatchKey {
    pub fn of(job: &Job) -> Self {
        let s = &job.settings;
        let schedule = &s.schedule;
        let steps = step_values(schedule);
        Self {
            mode: job.mode,
            sampler: s.sampler,
            prediction: s.step.prediction,
            eta: s.step.eta.to_bits(),
            clip_sample_range: s.step.clip_sample_range.map(f64::to_bits),
            // At or below 1 no unconditional pass runs; the scale is then unused.
            guidance: if s.uses_cfg() { s.guidance.to_bits() } else { 0 },
            guidance_rescale: if s.uses_cfg() { s.guidance_rescale.to_bits() } else { 0 },
            steps,
            final_alpha_cumprod: schedule.final_alpha_cumprod.to_bits(),
            latent_shape: job.latent_shape,
            own_latents: job.request.latents.is_some(),
            vae_encode: job.init.as_ref().map(|_| job.request.vae_encode),
            strength: job.init.as_ref().map(|init| init.strength.to_bits()),
            vae_tiling: job.request.vae_tiling,
            hires: job.hires.as_ref().map(|h| HiresKey {
                upscaler: h.upscaler,
                sampler: h.settings.sampler,
                upscale_to: (h.target.upscale_to.width, h.target.upscale_to.height),
                crop: (h.target.truncate_x, h.target.truncate_y),
                latent_shape: h.latent_shape,
                steps: step_values(&h.settings.schedule),
                final_alpha_cumprod: h.settings.schedule.final_alpha_cumprod.to_bits(),
                vae_encode: job.request.vae_encode,
                own_latents: job.request.hires_latents.is_some(),
            }),
        }
    }
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
    let mut groups: Vec<((usize, BatchKey), Vec<Item>)> = Vec::new();
    let mut group_of: HashMap<(usize, BatchKey), usize> = HashMap::new();
    for (j, job) in jobs.iter().enumerate() {
        let key = (sets[j], BatchKey::of(job));
        let items = job.images.iter().map(|&image| Item { job: j, image });
        match group_of.get(&key) {
            Some(&g) => groups[g].1.extend(items),
            None => {
                group_of.insert(key.clone(), groups.len());
                groups.push((key, items.collect()));
            }
        }
    }
    // Stable: within a set, settings keep their first-seen order.
    groups.sort_by_key(|((set, _), _)| *set);
    groups
        .iter()
        .flat_map(|(_, group)| group.chunks(batch_size.max(1)).map(<[Item]>::to_vec))
        .collect()
}

/// One text as the text encoder reads it: its characters and how they are read
/// (`--emphasis`, `--clip-skip`). The cache key of [`PromptEmbeddings`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TextKey {
    pub text: String,
    pub options: PromptOptions,
}

impl TextKey {
    pub fn new(text: &str, options: PromptOptions) -> Self {
        Self {
            text: text.to_string(),
            options,
        }
    }
}

/// The texts a job's images are conditioned on: the prompt, the negative prompt with CFG, and
/// with `--pad-conds` the empty prompt the shorter of the two is padded with; then the hires
/// pass's own prompts, where it has them.
pub fn job_texts(job: &Job) -> Vec<TextKey> {
    let options = job.request.prompt_options();
    let mut texts = vec![TextKey::new(&job.request.prompt, options)];
    if job.settings.uses_cfg() {
        texts.push(TextKey::new(&job.request.negative_prompt, options));
        if job.request.pad_conds {
            texts.push(TextKey::new("", options));
        }
    }
    if let Some(hires) = &job.hires {
        texts.extend(hires.prompt.as_deref().map(|p| TextKey::new(p, options)));
        if job.settings.uses_cfg() {
            texts.extend(hires.negative_prompt.as_deref().map(|p| TextKey::new(p, options)));
        }
    }
    texts
}

/// The texts the batches encode, each once, in order of use; counted only up to one past the
/// encode-ahead limit.
pub fn texts_to_encode(jobs: &[Job], batches: &[Vec<Item>]) -> Vec<TextKey> {
    let mut texts = Vec::new();
    let mut seen = HashSet::new();
    for item in batches.iter().flatten() {
        for text in job_texts(&jobs[item.job]) {
            if seen.insert(text.clone()) {
                texts.push(text);
                if texts.len() > ENCODE_AHEAD_TEXTS {
                    return texts;
                }
            }
        }
    }
    texts
}

/// Characters of a prompt a warning quotes before it cuts the rest.
const QUOTED_PROMPT_CHARS: usize = 60;

/// `text`, cut to [`QUOTED_PROMPT_CHARS`] with "..." when longer: long prompts are common now.
fn shortened(text: &str) -> String {
    match text.char_indices().nth(QUOTED_PROMPT_CHARS) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_string(),
    }
}

/// Text embeddings by text, encoded on demand and cached; once the encoder is freed, only what
/// was encoded before.
pub struct PromptEmbeddings {
    pub encoder: Option<TextEncoder>,
    cache: HashMap<TextKey, PromptEncoding>,
    /// Prompts already warned about (prompt editing or alternation kept as text), so that a
    /// prompt is named once however often it is encoded.
    warned: HashSet<String>,
}

impl PromptEmbeddings {
    pub fn new(encoder: TextEncoder) -> Self {
        Self {
            encoder: Some(encoder),
            cache: HashMap::new(),
            warned: HashSet::new(),
        }
    }

    /// Whether `text` is encoded already.
    pub fn has(&self, text: &TextKey) -> bool {
        self.cache.contains_key(text)
    }

    /// The embeddings of `text`, (1, 77 * chunks, dim) (and SDXL's pooled one); syntax of A1111's
    /// that sdfix keeps as text (prompt editing, alternation) is reported to `warn` once per
    /// prompt.
    pub fn get(&mut self, text: &TextKey, warn: &mut dyn FnMut(&str)) -> Result<PromptEncoding> {
        if let Some(e) = self.cache.get(text) {
            return Ok(e.clone());
        }
        let encoder = self.encoder.as_ref().with_context(|| {
            format!(
                "internal: {:?} was not encoded before the text encoder was freed",
                text.text
            )
        })?;
        if let Some(message) = unsupported_warning(&text.text) {
            if self.warned.insert(text.text.clone()) {
                warn(&format!("warning: {message} (in {:?})", shortened(&text.text)));
            }
        }
        let e = encoder
            .encode_prompt(&text.text, text.options)
            .with_context(|| format!("encoding the prompt {:?}", text.text))?;
        if self.cache.len() >= ENCODE_AHEAD_TEXTS {
            // Bounded: a long prompt file is mostly distinct prompts, used once each.
            self.cache.clear();
        }
        self.cache.insert(text.clone(), e.clone());
        Ok(e)
    }
}
