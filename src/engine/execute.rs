//! One UNet batch of a run: its initial latents (seeded noise, the request's own, or for
//! img2img the pictures' latents noised to the first step), its text embeddings, the
//! [`pipeline`](crate::pipeline) on them, then each image (inpainting's kept pixels pasted back)
//! to the observer. The batch's [`BatchMode`] says how it starts; [`super::batch::BatchKey`]
//! makes sure every image of a batch has the same one.

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

use super::batch::{Item, PromptEmbeddings, TextKey};
use super::hires_pass;
use super::init_image;
use super::micro::{PixelSize, TimeIds};
use super::observer::{Event, GeneratedImage, Interrupted, Observer};
use super::record::RecordContext;
use super::request::BatchMode;
use super::Job;
use crate::model::stable_diffusion::{PromptEncoding, StableDiffusion};
use crate::model::unet::{Conditioning, TextTime};
use crate::model::vae::VaeEncoder;
use crate::pipeline::{self, BatchInput, Inpainting, StepInfo};
use crate::prompt::pad_to_same_length;
use crate::sampling::noise::ImageNoise;

/// The loaded networks a batch runs on.
pub(super) struct Modules<'a> {
    pub(super) model: &'a StableDiffusion,
    /// Loaded when a run has an init picture.
    pub(super) encoder: Option<&'a VaeEncoder>,
    /// This is the run's last batch and the engine frees the UNet once its last denoising step
    /// is done ([`super::Engine::release_unet_when_done`]).
    pub(super) release_unet_when_done: bool,
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
/// from each image's encode stream; in tiles with `tiled` (`--vae-tiling`, as diffusers' img2img
/// and inpainting pipelines encode after `vae.enable_tiling()`).
fn encode(
    modules: &Modules,
    pictures: &Tensor,
    mode: init_image::VaeEncodeMode,
    tiled: bool,
    noise: &mut ImageNoise,
) -> Result<Tensor> {
    let encoder = modules.encoder.context("internal: the VAE encoder was not loaded")?;
    let pictures = pictures.to_dtype(modules.model.vae_dtype)?;
    let dist = if tiled {
        encoder.encode_tiled(&pictures)?
    } else {
        encoder.encode(&pictures)?
    };
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
    let tiled = first.request.vae_tiling;
    let (_, h, w) = first.latent_shape;
    let conditioned = first.mode == BatchMode::InpaintCondition;
    let from_noise = init.mask.is_some() && init.strength == 1.0;
    let image_latents = if from_noise && conditioned {
        None
    } else {
        Some(encode(
            modules,
            &init_pictures(jobs, batch, false, device)?,
            mode,
            tiled,
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
            img2img.masked_image_latents = Some(encode(modules, &masked, mode, tiled, noise)?);
        }
    }
    Ok(img2img)
}

/// One image's conditioning for the UNet: its embeddings, and for SDXL its pooled embedding
/// with its micro-conditioning.
fn conditioning(encoding: &PromptEncoding, time_ids: TimeIds) -> Conditioning {
    Conditioning {
        context: encoding.context.clone(),
        text_time: encoding.pooled.as_ref().map(|pooled| TextTime {
            text_embeds: pooled.clone(),
            time_ids: vec![time_ids],
        }),
    }
}

/// The batch's conditioning for pictures of `size` (SDXL's micro-conditioning depends on it):
/// each image's prompt, and with CFG its negative prompt.
fn conditionings(
    jobs: &[Job],
    batch: &[Item],
    prompts: &mut PromptEmbeddings,
    record: &RecordContext,
    (size, second_pass): (PixelSize, bool),
    warn: &mut dyn FnMut(&str),
) -> Result<(Vec<Conditioning>, Vec<Conditioning>)> {
    let settings = &jobs[batch[0].job].settings;
    let mut cond = Vec::with_capacity(batch.len());
    let mut uncond = Vec::with_capacity(batch.len());
    for item in batch {
        let job = &jobs[item.job];
        let request = &job.request;
        // The hires pass's own prompts where it has them (A1111's `hr_prompt`, `hr_negative_prompt`).
        let (prompt, negative_prompt) = match (&job.hires, second_pass) {
            (Some(hires), true) => hires.prompts(&request.prompt, &request.negative_prompt),
            _ => (request.prompt.as_str(), request.negative_prompt.as_str()),
        };
        let options = request.prompt_options();
        let mut positive = prompts.get(&TextKey::new(prompt, options), warn)?;
        let (time_ids, negative_time_ids) = request.micro.time_ids(size);
        if settings.uses_cfg() {
            // SDXL: diffusers zeroes the embeddings of an absent negative prompt when the
            // model's config says `force_zeros_for_empty_prompt` (A1111 does for an empty one).
            let mut negative = if positive.pooled.is_some()
                && record.configs.force_zeros_for_empty_prompt
                && negative_prompt.is_empty()
                && !request.encode_empty_negative
            {
                positive.zeros_like()?
            } else {
                prompts.get(&TextKey::new(negative_prompt, options), warn)?
            };
            if request.pad_conds {
                // A1111's "Pad prompt/negative prompt": the shorter gets empty chunks, so the two
                // share one UNet pass.
                let empty = prompts.get(&TextKey::new("", options), warn)?;
                let (c, u) = pad_to_same_length(&positive.context, &negative.context, &empty.context)?;
                (positive.context, negative.context) = (c, u);
            }
            uncond.push(conditioning(&negative, negative_time_ids));
            cond.push(conditioning(&positive, time_ids));
        } else {
            cond.push(conditioning(&positive, time_ids));
        }
    }
    Ok((cond, uncond))
}

/// One UNet batch: initial latents, embeddings, the pipeline, then each image to the observer.
pub(super) fn run_batch(
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
    // Jobs with latents of their own never share a batch with seeded ones (see `BatchKey`).
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
    let factor = model.vae.downscale_factor();
    let size = PixelSize {
        width: w * factor,
        height: h * factor,
    };
    let (cond, uncond) = conditionings(jobs, batch, prompts, record, (size, false), &mut warn)?;
    // The hires pass's, at its size (SDXL's micro-conditioning follows it).
    let hires_conds = match &first.hires {
        Some(hires) => Some(conditionings(
            jobs,
            batch,
            prompts,
            record,
            (hires.target.upscale_to, true),
            &mut warn,
        )?),
        None => None,
    };
    let text_seconds = text_started.elapsed().as_secs_f64();
    // With a hires pass, the steps of both passes count as one run of steps (as A1111's
    // progress): the second pass's step k is reported as first + k.
    let first_steps = settings.schedule.timesteps.len();
    let steps = first_steps + first.hires.as_ref().map_or(0, |h| h.settings.schedule.timesteps.len());
    observer.event(&Event::BatchStarted {
        images: batch.len(),
        steps,
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
        uncond: settings.uses_cfg().then_some(uncond.as_slice()),
        settings,
        inpainting,
        vae_tiling: first.request.vae_tiling,
    };
    let mut on_step = |step: &StepInfo, offset: usize| {
        observer.step(&StepInfo {
            index: offset + step.index,
            steps,
            ..*step
        });
        loop_done = Instant::now();
        if modules.release_unet_when_done && offset + step.index + 1 == steps {
            // The batch's (and the run's) last UNet call is done: the decode runs without its weights.
            model.release_unet();
        }
        if observer.interrupted() {
            return Err(Interrupted.into());
        }
        Ok(())
    };
    let (final_latents, images) = match (&first.hires, hires_conds) {
        (Some(hires), Some((hires_cond, hires_uncond))) => {
            let lowres = pipeline::denoise(model, input, &mut noise, &mut |step| on_step(step, 0))?;
            let own_noise = if first.request.hires_latents.is_some() {
                let rows = batch
                    .iter()
                    .map(|i| jobs[i.job].request.hires_latents.as_ref().map(|l| l.get(i.image)))
                    .collect::<Option<candle_core::Result<Vec<Tensor>>>>()
                    .context("internal: a batch mixes seeded hires noise and hires_latents")??;
                Some(Tensor::stack(&rows, 0)?)
            } else {
                None
            };
            let pass = hires_pass::SecondPass {
                hires,
                lowres,
                seeds: &seeds,
                noise: own_noise,
                cond: &hires_cond,
                uncond: settings.uses_cfg().then_some(hires_uncond.as_slice()),
                vae_tiling: first.request.vae_tiling,
            };
            let (mode, tiled) = (first.request.vae_encode, first.request.vae_tiling);
            let mut encode_pictures =
                |pictures: &Tensor, noise: &mut ImageNoise| encode(modules, pictures, mode, tiled, noise);
            hires_pass::run(model, pass, &mut encode_pictures, &mut |step| {
                on_step(step, first_steps)
            })?
        }
        _ => pipeline::denoise_and_decode(model, input, &mut noise, &mut |step| on_step(step, 0))?,
    };
    let unet_seconds = loop_done.duration_since(unet_started).as_secs_f64();
    let vae_seconds = loop_done.elapsed().as_secs_f64();
    observer.event(&Event::BatchDone {
        images: batch.len(),
        text_seconds,
        unet_seconds,
        vae_seconds,
    });
    let seconds_each = batch_started.elapsed().as_secs_f64() / batch.len() as f64;
    let (_, out_h, out_w) = first.hires.as_ref().map_or(first.latent_shape, |h| h.latent_shape);
    let final_latents = final_latents.to_device(&Device::Cpu)?;
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
            width: out_w * factor,
            height: out_h * factor,
            rgb,
            settings: record.image_record(job, item.image),
            latents: final_latents.get(b)?,
            initial_noise_mean: noise_means[b],
            seconds: seconds_each,
        })?;
    }
    Ok(batch.len())
}
