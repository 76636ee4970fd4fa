//! AUTOMATIC1111's API shapes (`modules/api/models.py` of stable-diffusion-webui) and their
//! translation into engine [`Request`]s: sampler and scheduler names, seeds, sizes and the
//! paper's fixes as request fields.
//!
//! Every field is optional and unknown fields are ignored: A1111 clients (`webuiapi` sends about
//! 45 fields) set many things sdfix has no use for (`restore_faces`, `styles`, ...),
//! and a null means "the default". The settings of a request come in as the engine's one
//! [`Overrides`] (so every sdfix setting is a request field too: `guidance_rescale`, `spacing`,
//! `zero_snr`, `sigmas`, `terminal_alpha_bar`, ...), with A1111's names as aliases
//! (`cfg_scale`, `denoising_strength`); the A1111-only fields (`seed: -1`, `sampler_name`,
//! `scheduler`, `batch_size`, `n_iter`, `resize_mode`, ...) are read here. A field of the wrong
//! type is an error that names it, and so is any setting the engine refuses
//! ([`RequestError::render`] in A1111's words).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::hires::HiresFields;
pub use super::names::{parse_sampler, samplers, schedulers};
use super::names::{parse_scheduler, scheduler_label, SCHEDULERS};
use super::Limits;
use crate::engine::hires::HiresTarget;
use crate::engine::init_image::{InitImage, MaskImage, ResizeMode};
use crate::engine::micro::PixelSize;
use crate::engine::overrides::InputReader;
use crate::engine::{Field, Overrides, Request, RequestError, Words};
use crate::sampling::Sampler;
use crate::schedule::SigmaSchedule;
use crate::weights::lora::Loras;

/// A1111's `sd_noise_schedule` option values.
pub const NOISE_SCHEDULE_ZERO_SNR: &str = "Zero Terminal SNR";
pub const NOISE_SCHEDULE_DEFAULT: &str = "Default";

/// The most `n_iter` (sequential batches) one request may ask for: a bounded queue of requests
/// bounds the work waiting only if each request is bounded too.
pub const MAX_N_ITER: usize = 16;

/// A1111's `seed: -1`: draw one.
const RANDOM_SEED: i64 = -1;

/// The body of `POST /sdapi/v1/txt2img`: the fields sdfix reads.
#[derive(Debug, Default, Deserialize)]
pub struct Txt2Img {
    /// Every setting of a request by its key or A1111 alias: `prompt`, `negative_prompt`,
    /// `steps`, `cfg_scale`, `width`, `height`, `eta` (DDIM's only; other samplers ignore it, as
    /// A1111's ancestral eta has no counterpart here), and sdfix's own. Read from the body by
    /// [`settings_of`] (serde's `flatten` would lose the name of a field of the wrong type).
    #[serde(skip)]
    pub settings: Overrides,
    /// -1 (or absent) draws a random seed; image k uses seed + k (as A1111).
    pub seed: Option<i64>,
    /// Images per UNet batch in A1111; here images per repeat, at most `--max-batch`.
    pub batch_size: Option<usize>,
    /// Repeats of `batch_size` images.
    pub n_iter: Option<usize>,
    pub sampler_name: Option<String>,
    /// Old A1111 clients name the sampler here.
    pub sampler_index: Option<String>,
    /// A1111's schedule type: Automatic, Uniform, Karras or Exponential.
    pub scheduler: Option<String>,
    /// `sd_model_checkpoint` (a model for this request only) and `sd_noise_schedule`.
    pub override_settings: Option<BTreeMap<String, Value>>,
    /// Also write the images to `--out-dir` with the manifest.
    pub save_images: Option<bool>,
    /// Return the images in the response [default true].
    pub send_images: Option<bool>,
    /// A1111's hires fix (txt2img only): on with `enable_hr`, then `hr_scale` [default 2] unless
    /// `hr_resize_x`/`hr_resize_y` (either may be 0), `hr_upscaler` (A1111's names: "Latent",
    /// "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)", "Latent
    /// (nearest)", "Latent (nearest-exact)", "Lanczos"; "None" is Lanczos too, as A1111's
    /// `resize_image`), `hr_second_pass_steps` [default 0: `steps`] and `denoising_strength`
    /// [default 0.75, A1111's]. Without `enable_hr` they are ignored, as A1111 does.
    #[serde(flatten)]
    pub hires: HiresFields,
}

/// The body of `POST /sdapi/v1/img2img`: txt2img's fields plus the picture, strength and mask
/// (A1111's `StableDiffusionImg2ImgProcessingAPI`; its other fields are ignored). `mask`,
/// `mask_blur` and `denoising_strength` are settings ([`Overrides`]).
#[derive(Debug, Default, Deserialize)]
pub struct Img2Img {
    #[serde(flatten)]
    pub base: Txt2Img,
    /// Base64 pictures (a `data:image/...;base64,` prefix is stripped); the first is used.
    pub init_images: Option<Vec<String>>,
    /// 1 repaints the black part instead.
    pub inpainting_mask_invert: Option<u8>,
    /// 0 just resize (stretch), 1 crop and resize, 2 resize and fill (fit) [default 0, as A1111].
    pub resize_mode: Option<u8>,
}

/// A base64 picture of a request, decoded.
pub fn decode_base64(value: &str) -> anyhow::Result<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(strip_data_url(value).trim())
        .map_err(|e| anyhow::anyhow!("not base64 ({e})"))
}

/// Reads a request's pictures from base64 (`init_images[0]`, `mask`); LoRAs are the server's.
#[derive(Default)]
struct Base64Inputs {
    invert_mask: bool,
}

impl InputReader for Base64Inputs {
    fn init_image(&mut self, reference: &str) -> anyhow::Result<Arc<InitImage>> {
        InitImage::decode(&decode_base64(reference)?, "init_images[0]")
    }

    fn mask(&mut self, reference: &str) -> anyhow::Result<Arc<MaskImage>> {
        let mask = MaskImage::decode(&decode_base64(reference)?, "mask")?;
        if !self.invert_mask {
            return Ok(mask);
        }
        let mut inverted = (*mask).clone();
        image::imageops::invert(&mut inverted.pixels);
        Ok(Arc::new(inverted))
    }

    fn loras(&mut self, _: &[String]) -> anyhow::Result<Arc<Loras>> {
        anyhow::bail!("are not taken per request by this server (start `sdfix serve` with --lora)")
    }
}

/// A refused setting, in A1111's words (the picture as the field it came from).
pub fn invalid(err: &RequestError) -> ApiError {
    match err.field {
        Field::InitImage => ApiError::invalid(err.render_as("init_images[0]", Words::Api)),
        _ => ApiError::invalid(err.render(Words::Api)),
    }
}

/// The settings of a request body ([`Overrides`], every other key ignored); a value of the
/// wrong type names its key. A1111's `seed` (-1 for random) is read by [`Txt2Img`] instead.
pub fn settings_of(body: &Value) -> Result<Overrides, ApiError> {
    let mut body = body.clone();
    if let Some(object) = body.as_object_mut() {
        object.remove("seed");
    }
    Overrides::parse_object(body, false).map_err(ApiError::invalid)
}

/// An image side: a multiple of 8, as A1111's sliders step (the engine then checks the model's
/// own VAE factor).
fn check_side(field: Field, value: Option<usize>) -> Result<(), ApiError> {
    match value {
        Some(v) if v == 0 || v % 8 != 0 => Err(invalid(&RequestError::new(
            field,
            format!("{v} must be a positive multiple of 8"),
        ))),
        _ => Ok(()),
    }
}

impl Img2Img {
    /// [`Txt2Img::resolve`] with the picture, strength and mask.
    pub fn resolve(
        mut self,
        limits: &Limits,
        noise_schedule: Option<bool>,
        random_seed: u64,
    ) -> Result<Resolved, ApiError> {
        let first = self
            .init_images
            .take()
            .and_then(|images| images.into_iter().next())
            .ok_or_else(|| ApiError::invalid("init_images: give one base64 picture to start from"))?;
        let invert_mask = match self.inpainting_mask_invert {
            None | Some(0) => false,
            Some(1) => true,
            Some(other) => {
                return Err(ApiError::invalid(format!(
                    "inpainting_mask_invert: expected 0 or 1, got {other}"
                )))
            }
        };
        let resize = match self.resize_mode.unwrap_or(0) {
            0 => ResizeMode::Stretch,
            1 => ResizeMode::Crop,
            2 => ResizeMode::Fit,
            other => {
                return Err(ApiError::invalid(format!(
                    "resize_mode: {other} is not one sdfix has; expected 0 (just resize), 1 (crop and resize) \
                     or 2 (resize and fill)"
                )))
            }
        };
        let settings = &mut self.base.settings;
        settings.init_image = Some(first);
        settings.resize = Some(resize);
        if settings.mask.is_none() {
            // A1111 clients send a mask blur with every img2img request.
            settings.mask_blur = None;
        }
        // A1111 makes `width` x `height` (default 512); without them, the picture's own size.
        self.base
            .resolve_with(limits, noise_schedule, random_seed, &mut Base64Inputs { invert_mask })
    }
}

/// A request as the engine takes it, plus what the response reports.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub request: Request,
    /// A model for this request only (`override_settings.sd_model_checkpoint`).
    pub model: Option<String>,
    pub sampler_label: &'static str,
    pub scheduler_label: &'static str,
    pub batch_size: usize,
    pub n_iter: usize,
    pub save_images: bool,
    pub send_images: bool,
}

/// A1111's options (`override_settings`) that are sdfix settings, by option name and key:
/// "Clip skip", the emphasis mode and "Pad prompt/negative prompt".
const A1111_OPTIONS: [(&str, &str); 3] = [
    ("CLIP_stop_at_last_layers", "clip_skip"),
    ("emphasis", "emphasis"),
    ("pad_cond_uncond", "pad_conds"),
];

/// Sets the settings of [`A1111_OPTIONS`] that `override_settings` names on `request`, over the
/// body's own; a bad value names its option.
fn apply_a1111_options(
    overrides: &BTreeMap<String, Value>,
    request: &mut Request,
    inputs: &mut Base64Inputs,
) -> Result<(), ApiError> {
    for (option, key) in A1111_OPTIONS {
        let Some(value) = overrides.get(option).filter(|v| !v.is_null()) else {
            continue;
        };
        let prefix = format!("\"{key}\": ");
        let setting = Overrides::parse_object(json!({ key: value }), true).map_err(|e| {
            ApiError::invalid(format!(
                "override_settings.{option}: {}",
                e.strip_prefix(&prefix).unwrap_or(&e)
            ))
        })?;
        setting.apply(request, inputs).map_err(|e| invalid(&e))?;
    }
    Ok(())
}

/// `sd_noise_schedule` as A1111 spells it, to zero SNR on or off.
pub fn parse_noise_schedule(value: &Value, field: &str) -> Result<bool, ApiError> {
    match value.as_str() {
        Some(NOISE_SCHEDULE_ZERO_SNR) => Ok(true),
        Some(NOISE_SCHEDULE_DEFAULT) => Ok(false),
        _ => Err(ApiError::invalid(format!(
            "{field}: expected \"{NOISE_SCHEDULE_ZERO_SNR}\" or \"{NOISE_SCHEDULE_DEFAULT}\", got {value}"
        ))),
    }
}

impl Txt2Img {
    /// Checks every field against `limits` and translates it; `noise_schedule` is the server's
    /// `sd_noise_schedule` option (None: the model's config), `random_seed` the seed for -1.
    /// A1111's txt2img takes no picture: its `denoising_strength` is the hires fix's, and
    /// `mask` and `mask_blur` are img2img's, so they are ignored here.
    pub fn resolve(
        mut self,
        limits: &Limits,
        noise_schedule: Option<bool>,
        random_seed: u64,
    ) -> Result<Resolved, ApiError> {
        let settings = &mut self.settings;
        let (hires, hires_sampler_sigmas) = self.hires.fix(settings.strength)?;
        (
            settings.init_image,
            settings.mask,
            settings.strength,
            settings.mask_blur,
        ) = (None, None, None, None);
        let mut resolved = self.resolve_with(limits, noise_schedule, random_seed, &mut Base64Inputs::default())?;
        if hires.is_on() {
            if let (Some(width), Some(height)) = (resolved.request.width, resolved.request.height) {
                // The server's pixel bound holds for the hires size too (with A1111's 8 px factor).
                let to = HiresTarget::new(PixelSize { width, height }, hires.scale, hires.size, 8).upscale_to;
                if to.width.saturating_mul(to.height) > limits.max_pixels {
                    return Err(ApiError::invalid(format!(
                        "enable_hr: the hires size {to} is {} pixels, over the server's --max-pixels {}",
                        to.width.saturating_mul(to.height),
                        limits.max_pixels
                    )));
                }
            }
            if let Some(sigmas) = hires_sampler_sigmas.filter(|&s| s != resolved.request.sigmas) {
                return Err(ApiError::invalid(format!(
                    "hr_sampler_name: names the {sigmas} schedule type, but the hires pass keeps the first pass's \
                     ({}); give the sampler's name without it",
                    resolved.request.sigmas
                )));
            }
            resolved.request.hires = hires;
        }
        Ok(resolved)
    }

    fn resolve_with(
        self,
        limits: &Limits,
        noise_schedule: Option<bool>,
        random_seed: u64,
        inputs: &mut Base64Inputs,
    ) -> Result<Resolved, ApiError> {
        let overrides = self.override_settings.unwrap_or_default();
        let model = match overrides.get("sd_model_checkpoint") {
            None | Some(Value::Null) => None,
            Some(Value::String(name)) => Some(name.clone()),
            Some(other) => {
                return Err(ApiError::invalid(format!(
                    "override_settings.sd_model_checkpoint: expected a model name, got {other}"
                )))
            }
        };
        let zero_snr = match (self.settings.zero_snr, overrides.get("sd_noise_schedule")) {
            (Some(z), _) => Some(z),
            (None, None | Some(Value::Null)) => noise_schedule,
            (None, Some(v)) => Some(parse_noise_schedule(v, "override_settings.sd_noise_schedule")?),
        };
        let (sampler, suffix_sigmas) = match self.sampler_name.or(self.sampler_index) {
            None => (self.settings.sampler.unwrap_or_default(), None),
            Some(name) => parse_sampler(&name).ok_or_else(|| {
                let names: Vec<&str> = Sampler::ALL.iter().map(|s| s.a1111_name()).collect();
                ApiError::invalid(format!(
                    "sampler_name: unknown sampler {name:?}; expected one of {}",
                    names.join(", ")
                ))
            })?,
        };
        let sigmas = match self.scheduler.as_deref() {
            None => suffix_sigmas.or(self.settings.sigmas).unwrap_or_default(),
            Some(name) => {
                let (_, sigmas) = parse_scheduler(name).ok_or_else(|| {
                    let names: Vec<&str> = SCHEDULERS.iter().map(|(_, label, _)| *label).collect();
                    ApiError::invalid(format!(
                        "scheduler: unknown scheduler {name:?}; expected one of {}",
                        names.join(", ")
                    ))
                })?;
                // "Automatic" leaves the choice to a `DPM++ 2M Karras`-style sampler name.
                if sigmas == SigmaSchedule::Schedule {
                    suffix_sigmas.unwrap_or(sigmas)
                } else {
                    sigmas
                }
            }
        };
        let mut request = Request::new("");
        self.settings.apply(&mut request, inputs).map_err(|e| invalid(&e))?;
        apply_a1111_options(&overrides, &mut request, inputs)?;
        request.zero_snr = zero_snr;
        request.sampler = sampler;
        request.sigmas = sigmas;
        // A1111's `eta` is DDIM's and the ancestral samplers'; only DDIM takes one here.
        if sampler != Sampler::Ddim {
            request.eta = 0.0;
        }
        check_side(Field::Width, request.width)?;
        check_side(Field::Height, request.height)?;
        let steps = request.steps;
        if steps == 0 || steps > limits.max_steps {
            return Err(invalid(&RequestError::new(
                Field::Steps,
                format!(
                    "{steps} must be between 1 and {} (the server's --max-steps)",
                    limits.max_steps
                ),
            )));
        }
        if let (Some(w), Some(h)) = (request.width, request.height) {
            if w.saturating_mul(h) > limits.max_pixels {
                return Err(ApiError::invalid(format!(
                    "width, height: {w}x{h} is {} pixels, over the server's --max-pixels {}",
                    w.saturating_mul(h),
                    limits.max_pixels
                )));
            }
        }
        let batch_size = self.batch_size.unwrap_or(1);
        if batch_size == 0 || batch_size > limits.max_batch {
            return Err(ApiError::invalid(format!(
                "batch_size: {batch_size} must be between 1 and {} (the server's --max-batch)",
                limits.max_batch
            )));
        }
        let n_iter = self.n_iter.unwrap_or(1);
        if n_iter == 0 || n_iter > MAX_N_ITER {
            return Err(ApiError::invalid(format!(
                "n_iter: {n_iter} must be between 1 and {MAX_N_ITER}"
            )));
        }
        request.seed = match self.seed {
            None | Some(RANDOM_SEED) => random_seed,
            Some(s) if s < 0 => {
                return Err(ApiError::invalid(format!(
                    "seed: {s} must be -1 (random) or at least 0"
                )))
            }
            Some(s) => s as u64,
        };
        request.num_images = Some(batch_size * n_iter);
        Ok(Resolved {
            request,
            model,
            sampler_label: sampler.a1111_name(),
            scheduler_label: scheduler_label(sigmas),
            batch_size,
            n_iter,
            save_images: self.save_images.unwrap_or(false),
            send_images: self.send_images.unwrap_or(true),
        })
    }
}

/// Strips a `data:image/png;base64,` prefix from an image a client sends (A1111 accepts both).
pub fn strip_data_url(image: &str) -> &str {
    match image.split_once(";base64,") {
        Some((head, rest)) if head.starts_with("data:") => rest,
        _ => image,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::hires::HiresResize;
    use crate::engine::request::DEFAULT_GUIDANCE_RESCALE;
    use crate::schedule::TimestepSpacing;
    use crate::serve::hires::A1111_HIRES_STRENGTH;

    fn limits() -> Limits {
        Limits {
            max_pixels: 512 * 512,
            max_steps: 150,
            max_batch: 4,
            queue: 4,
        }
    }

    /// As the route does: a value that does not parse is an error naming its field.
    fn resolve(body: Value) -> Result<Resolved, ApiError> {
        let mut request: Txt2Img = serde_path_to_error::deserialize(&body)?;
        request.settings = settings_of(&body)?;
        request.resolve(&limits(), None, 99)
    }

    #[test]
    fn sampler_names_of_every_spelling() {
        assert_eq!(parse_sampler("Euler a"), Some((Sampler::EulerAncestral, None)));
        assert_eq!(parse_sampler("euler_a"), Some((Sampler::EulerAncestral, None)));
        assert_eq!(parse_sampler("k_euler_a"), Some((Sampler::EulerAncestral, None)));
        assert_eq!(parse_sampler("DDIM"), Some((Sampler::Ddim, None)));
        assert_eq!(
            parse_sampler("DPM++ 2M Karras"),
            Some((Sampler::DpmPp2m, Some(SigmaSchedule::Karras)))
        );
        assert_eq!(parse_sampler("UniPC"), Some((Sampler::UniPc, None)));
        assert_eq!(parse_sampler("LMS"), None);
    }

    #[test]
    fn defaults_are_the_papers() {
        let r = resolve(json!({"prompt": "x", "seed": -1, "width": null, "restore_faces": false})).unwrap();
        assert_eq!(r.request.seed, 99);
        assert_eq!(r.request.spacing, TimestepSpacing::Trailing);
        assert_eq!(r.request.guidance_rescale, DEFAULT_GUIDANCE_RESCALE);
        assert_eq!(r.request.zero_snr, None);
        assert_eq!(r.request.sampler, Sampler::Ddim);
        assert_eq!((r.sampler_label, r.scheduler_label), ("DDIM", "Automatic"));
    }

    #[test]
    fn the_fixes_are_request_fields() {
        let r = resolve(json!({
            "spacing": "leading", "guidance_rescale": 0.0,
            "override_settings": {"sd_noise_schedule": "Default"},
        }))
        .unwrap();
        assert_eq!(r.request.spacing, TimestepSpacing::Leading);
        assert_eq!(r.request.zero_snr, Some(false));
        let r = resolve(json!({"zero_snr": true, "override_settings": {"sd_noise_schedule": "Default"}})).unwrap();
        assert_eq!(r.request.zero_snr, Some(true), "the field wins over the override");
    }

    #[test]
    fn a1111_prompt_options_are_settings() {
        let r = resolve(json!({
            "clip_skip": 3,
            "override_settings": {"CLIP_stop_at_last_layers": 2, "emphasis": "No norm", "pad_cond_uncond": true},
        }))
        .unwrap();
        assert_eq!(
            r.request.clip_skip, 2,
            "the option wins over the field, as A1111's override"
        );
        assert_eq!(r.request.emphasis, crate::prompt::Emphasis::NoNorm);
        assert!(r.request.pad_conds);
        let err = resolve(json!({"override_settings": {"emphasis": "Loud"}})).unwrap_err();
        assert!(
            err.detail.contains("override_settings.emphasis: unknown emphasis"),
            "{err:?}"
        );
        let err = resolve(json!({"override_settings": {"CLIP_stop_at_last_layers": "two"}})).unwrap_err();
        assert!(
            err.detail.contains("override_settings.CLIP_stop_at_last_layers: "),
            "{err:?}"
        );
    }

    /// `vae_tiling` is an sdfix field (A1111 has no tiled VAE of its own), a boolean.
    #[test]
    fn vae_tiling_is_a_request_field() {
        assert!(!resolve(json!({})).unwrap().request.vae_tiling);
        assert!(resolve(json!({"vae_tiling": true})).unwrap().request.vae_tiling);
        let err = resolve(json!({"vae_tiling": "yes"})).unwrap_err();
        assert!(err.detail.contains("vae_tiling"), "{err:?}");
    }

    #[test]
    fn bad_fields_are_named() {
        for (body, field) in [
            (json!({"width": 30}), "width"),
            (json!({"height": 0}), "height"),
            (json!({"width": 1024, "height": 1024}), "width, height"),
            (json!({"steps": 151}), "steps"),
            (json!({"steps": 0}), "steps"),
            (json!({"batch_size": 5}), "batch_size"),
            (json!({"n_iter": 17}), "n_iter"),
            (json!({"seed": -2}), "seed"),
            (json!({"sampler_name": "LMS"}), "sampler_name"),
            (json!({"scheduler": "Polyexponential"}), "scheduler"),
            (json!({"spacing": "sideways"}), "spacing"),
            (
                json!({"override_settings": {"sd_noise_schedule": "Zero"}}),
                "sd_noise_schedule",
            ),
        ] {
            let err = resolve(body.clone()).unwrap_err();
            assert!(err.detail.contains(field), "{body}: {}", err.detail);
        }
    }

    /// The engine's refusals are worded with A1111's field names (the request error's field,
    /// not a rewrite of the command line's message).
    #[test]
    fn engine_messages_name_fields() {
        let err = RequestError::new(Field::Guidance, "-1 must not be negative");
        assert_eq!(invalid(&err).detail, "cfg_scale: -1 must not be negative");
        let err = RequestError::new(Field::Sigmas, "needs {terminal_alpha_bar=comfy}");
        assert_eq!(invalid(&err).detail, "scheduler: needs terminal_alpha_bar: \"comfy\"");
    }

    #[test]
    fn txt2img_ignores_the_hires_strength_and_img2img_takes_the_picture_fields() {
        let r = resolve(json!({"denoising_strength": 0.7, "mask_blur": 4})).unwrap();
        assert_eq!((r.request.strength, r.request.mask_blur), (None, None));
        let r = resolve(json!({"sampler": "euler_a", "sigmas": "karras", "terminal_alpha_bar": "comfy"})).unwrap();
        assert_eq!(r.request.sampler, Sampler::EulerAncestral);
        assert_eq!(r.request.sigmas, SigmaSchedule::Karras);
        let err = resolve(json!({"sampler": "heun"})).unwrap_err();
        assert!(err.detail.contains("heun"), "{}", err.detail);
    }

    #[test]
    fn the_hires_fields_are_a1111s() {
        // webuiapi sends every hires field; without enable_hr they change nothing.
        let r = resolve(json!({"enable_hr": false, "hr_scale": 2, "hr_upscaler": "Latent", "denoising_strength": 0.7}))
            .unwrap();
        assert!(!r.request.hires.is_on());
        let r = resolve(json!({
            "enable_hr": true, "hr_scale": 1.5, "hr_resize_x": 0, "hr_resize_y": 0,
            "hr_upscaler": "Latent (bicubic antialiased)", "hr_second_pass_steps": 12, "denoising_strength": 0.55,
            "width": 256, "height": 256,
        }))
        .unwrap();
        let hires = r.request.hires;
        assert_eq!((hires.scale, hires.size), (Some(1.5), None));
        assert_eq!(hires.upscaler.map(|u| u.name()), Some("latent-bicubic-antialiased"));
        assert_eq!((hires.steps, hires.strength), (Some(12), Some(0.55)));
        assert_eq!(r.request.strength, None, "not img2img's");
        let r = resolve(json!({"enable_hr": true, "hr_resize_x": 512, "width": 256, "height": 256})).unwrap();
        assert_eq!(r.request.hires.size, Some(HiresResize { width: 512, height: 0 }));
        assert_eq!(r.request.hires.strength, Some(A1111_HIRES_STRENGTH));
        // The second-pass overrides: the prompts and the sampler are the second pass's own;
        // empty or "Use same ..." asks for the first pass's.
        for same in [
            json!({"enable_hr": true, "prompt": "a cat", "hr_prompt": "", "hr_sampler_name": null}),
            json!({"enable_hr": true, "hr_sampler_name": "Use same sampler", "hr_checkpoint_name": "Use same checkpoint"}),
            json!({"enable_hr": true, "hr_scheduler": "Use same scheduler", "hr_negative_prompt": ""}),
            json!({"enable_hr": false, "hr_prompt": "a dog", "hr_sampler_name": "LMS"}),
        ] {
            let r = resolve(same.clone()).unwrap_or_else(|e| panic!("{same}: {}", e.detail));
            let h = &r.request.hires;
            assert_eq!(
                (&h.prompt, &h.negative_prompt, h.sampler),
                (&None, &None, None),
                "{same}"
            );
        }
        let r = resolve(json!({
            "enable_hr": true, "prompt": "a cat", "hr_prompt": "a cat, (detailed:1.2)",
            "hr_negative_prompt": "blurry", "sampler_name": "DDIM", "hr_sampler_name": "Euler a",
        }))
        .unwrap();
        let h = &r.request.hires;
        assert_eq!(h.prompt.as_deref(), Some("a cat, (detailed:1.2)"));
        assert_eq!(h.negative_prompt.as_deref(), Some("blurry"));
        assert_eq!(h.sampler, Some(Sampler::EulerAncestral));
        // A schedule suffix is fine when it is the first pass's schedule type.
        let r =
            resolve(json!({"enable_hr": true, "scheduler": "Karras", "hr_sampler_name": "DPM++ 2M Karras"})).unwrap();
        assert_eq!(r.request.hires.sampler, Some(Sampler::DpmPp2m));
        for (body, field) in [
            (
                json!({"enable_hr": true, "hr_sampler_name": "LMS"}),
                "hr_sampler_name: unknown",
            ),
            (
                json!({"enable_hr": true, "hr_sampler_name": "DPM++ 2M Karras"}),
                "hr_sampler_name: names the karras",
            ),
            (json!({"enable_hr": true, "hr_scheduler": "Karras"}), "hr_scheduler"),
            (
                json!({"enable_hr": true, "hr_checkpoint_name": "other.safetensors"}),
                "hr_checkpoint_name",
            ),
        ] {
            let err = resolve(body).unwrap_err();
            assert!(err.detail.starts_with(field), "{}", err.detail);
        }
        let err = resolve(json!({"enable_hr": true, "hr_upscaler": "R-ESRGAN 4x+"})).unwrap_err();
        assert!(
            err.detail.starts_with("hr_upscaler: \"R-ESRGAN 4x+\""),
            "{}",
            err.detail
        );
        let err = resolve(json!({"enable_hr": true, "hr_scale": 4, "width": 256, "height": 256})).unwrap_err();
        assert!(err.detail.contains("over the server's --max-pixels"), "{}", err.detail);
    }

    #[test]
    fn data_urls_lose_their_prefix() {
        assert_eq!(strip_data_url("data:image/png;base64,iVBOR"), "iVBOR");
        assert_eq!(strip_data_url("iVBOR"), "iVBOR");
    }
}
