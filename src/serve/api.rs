//! AUTOMATIC1111's API shapes (`modules/api/models.py` of stable-diffusion-webui) and their
//! translation into engine [`Request`]s: sampler and scheduler names, seeds, sizes and the
//! paper's fixes as request fields.
//!
//! Every field is optional and unknown fields are ignored: A1111 clients (`webuiapi` sends about
//! 45 fields) set many things sdfix has no use for (`restore_faces`, `enable_hr`, `styles`, ...),
//! and a null means "the default". A field of the wrong type is an error that names it.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::Limits;
use crate::engine::init_image::{InitImage, MaskImage, ResizeMode};
use crate::engine::request::{
    DEFAULT_GUIDANCE, DEFAULT_GUIDANCE_RESCALE, DEFAULT_SPACING, DEFAULT_STEPS, DEFAULT_STRENGTH,
};
use crate::engine::Request;
use crate::sampling::Sampler;
use crate::schedule::{SigmaSchedule, TimestepSpacing};

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
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
    /// -1 (or absent) draws a random seed; image k uses seed + k (as A1111).
    pub seed: Option<i64>,
    /// Images per UNet batch in A1111; here images per repeat, at most `--max-batch`.
    pub batch_size: Option<usize>,
    /// Repeats of `batch_size` images.
    pub n_iter: Option<usize>,
    pub steps: Option<usize>,
    pub cfg_scale: Option<f64>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub sampler_name: Option<String>,
    /// Old A1111 clients name the sampler here.
    pub sampler_index: Option<String>,
    /// A1111's schedule type: Automatic, Uniform, Karras or Exponential.
    pub scheduler: Option<String>,
    /// DDIM's eta; for the other samplers A1111's ancestral eta, which sdfix fixes at 1 for
    /// `Euler a` and does not take.
    pub eta: Option<f64>,
    /// The paper's fix 4: CFG rescale phi [default 0.7].
    pub guidance_rescale: Option<f64>,
    /// The paper's fix 3: trailing (default), leading or linspace.
    pub spacing: Option<String>,
    /// The paper's fix 1 [default: the model's scheduler config].
    pub zero_snr: Option<bool>,
    /// `sd_model_checkpoint` (a model for this request only) and `sd_noise_schedule`.
    pub override_settings: Option<BTreeMap<String, Value>>,
    /// Also write the images to `--out-dir` with the manifest.
    pub save_images: Option<bool>,
    /// Return the images in the response [default true].
    pub send_images: Option<bool>,
}

/// The body of `POST /sdapi/v1/img2img`: txt2img's fields plus the picture, strength and mask
/// (A1111's `StableDiffusionImg2ImgProcessingAPI`; its other fields are ignored).
#[derive(Debug, Default, Deserialize)]
pub struct Img2Img {
    #[serde(flatten)]
    pub base: Txt2Img,
    /// Base64 pictures (a `data:image/...;base64,` prefix is stripped); the first is used.
    pub init_images: Option<Vec<String>>,
    /// A1111's strength [default 0.75].
    pub denoising_strength: Option<f64>,
    /// Base64 mask: white repaints, black keeps.
    pub mask: Option<String>,
    /// Blur of the mask's edge for the paste-back, px [default 4].
    pub mask_blur: Option<f64>,
    /// 1 repaints the black part instead.
    pub inpainting_mask_invert: Option<u8>,
    /// 0 just resize (stretch), 1 crop and resize, 2 resize and fill (fit) [default 0, as A1111].
    pub resize_mode: Option<u8>,
}

/// A base64 picture of a request, decoded (its label names the field in errors and records).
fn decode_base64(field: &str, value: &str) -> Result<Vec<u8>, ApiError> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(strip_data_url(value).trim())
        .map_err(|e| ApiError::invalid(format!("{field}: not base64 ({e})")))
}

impl Img2Img {
    /// [`Txt2Img::resolve`], then the picture and mask decoded and checked.
    pub fn resolve(
        self,
        limits: &Limits,
        noise_schedule: Option<bool>,
        random_seed: u64,
    ) -> Result<Resolved, ApiError> {
        let mut resolved = self.base.resolve(limits, noise_schedule, random_seed)?;
        let first = self
            .init_images
            .as_ref()
            .and_then(|images| images.first())
            .ok_or_else(|| ApiError::invalid("init_images: give one base64 picture to start from"))?;
        let init = InitImage::decode(&decode_base64("init_images[0]", first)?, "init_images[0]")
            .map_err(|e| ApiError::invalid(field_names(&format!("{e:#}")).replace("--init-image ", "")))?;
        let request = &mut resolved.request;
        request.init_image = Some(init);
        if let Some(mask) = &self.mask {
            let decoded = MaskImage::decode(&decode_base64("mask", mask)?, "mask")
                .map_err(|e| ApiError::invalid(format!("{e:#}").replace("--mask ", "")))?;
            let decoded = match self.inpainting_mask_invert {
                None | Some(0) => decoded,
                Some(1) => {
                    let mut inverted = (*decoded).clone();
                    image::imageops::invert(&mut inverted.pixels);
                    std::sync::Arc::new(inverted)
                }
                Some(other) => {
                    return Err(ApiError::invalid(format!(
                        "inpainting_mask_invert: expected 0 or 1, got {other}"
                    )))
                }
            };
            request.mask = Some(decoded);
            request.mask_blur = self.mask_blur;
        }
        request.strength = Some(self.denoising_strength.unwrap_or(DEFAULT_STRENGTH));
        request.resize = match self.resize_mode.unwrap_or(0) {
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
        // A1111 makes `width` x `height` (default 512); without them, the picture's own size.
        Ok(resolved)
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

/// A1111's sampler names and sdfix's, for `/samplers` and `sampler_name`.
pub fn samplers() -> Value {
    Value::Array(
        Sampler::ALL
            .iter()
            .map(|s| json!({"name": s.a1111_name(), "aliases": [s.name()], "options": {}}))
            .collect(),
    )
}

/// A1111's schedule types that sdfix has, by name and label, and what each maps to: `automatic`
/// and `uniform` are the timesteps of `spacing` at their own noise level.
const SCHEDULERS: [(&str, &str, SigmaSchedule); 4] = [
    ("automatic", "Automatic", SigmaSchedule::Schedule),
    ("uniform", "Uniform", SigmaSchedule::Schedule),
    ("karras", "Karras", SigmaSchedule::Karras),
    ("exponential", "Exponential", SigmaSchedule::Exponential),
];

/// The body of `/schedulers`.
pub fn schedulers() -> Value {
    Value::Array(
        SCHEDULERS
            .iter()
            .map(|(name, label, sigmas)| {
                json!({
                    "name": name, "label": label, "aliases": null,
                    "default_rho": if *sigmas == SigmaSchedule::Karras { 7.0 } else { -1.0 },
                    "need_inner_model": false,
                })
            })
            .collect(),
    )
}

/// A sampler by A1111 label (`Euler a`), sdfix name (`euler_a`) or A1111 alias (`k_euler_a`),
/// any case; a label with a schedule suffix (`DPM++ 2M Karras`, A1111 before 1.9) also gives
/// the schedule.
pub fn parse_sampler(name: &str) -> Option<(Sampler, Option<SigmaSchedule>)> {
    let lower = name.trim().to_lowercase();
    let find = |n: &str| {
        let n = n.strip_prefix("k_").unwrap_or(n);
        Sampler::ALL
            .into_iter()
            .find(|s| s.a1111_name().to_lowercase() == n || s.name() == n)
    };
    if let Some(sampler) = find(&lower) {
        return Some((sampler, None));
    }
    for (suffix, sigmas) in [
        (" karras", SigmaSchedule::Karras),
        (" exponential", SigmaSchedule::Exponential),
    ] {
        if let Some(sampler) = lower.strip_suffix(suffix).and_then(find) {
            return Some((sampler, Some(sigmas)));
        }
    }
    None
}

/// A schedule type by name or label, any case.
fn parse_scheduler(name: &str) -> Option<(&'static str, SigmaSchedule)> {
    let lower = name.trim().to_lowercase();
    SCHEDULERS
        .iter()
        .find(|(n, _, _)| *n == lower)
        .map(|(_, label, sigmas)| (*label, *sigmas))
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

/// The label of a sigma schedule, for responses.
fn scheduler_label(sigmas: SigmaSchedule) -> &'static str {
    SCHEDULERS
        .iter()
        .find(|(_, _, s)| *s == sigmas)
        .map_or("Automatic", |(_, label, _)| label)
}

/// An image side: positive, a multiple of 8 (the VAE factor; the engine then checks the UNet's
/// own multiple, 64 for SD).
fn check_side(field: &str, value: Option<usize>) -> Result<Option<usize>, ApiError> {
    match value {
        Some(v) if v == 0 || v % 8 != 0 => Err(ApiError::invalid(format!(
            "{field}: {v} must be a positive multiple of 8"
        ))),
        _ => Ok(value),
    }
}

impl Txt2Img {
    /// Checks every field against `limits` and translates it; `noise_schedule` is the server's
    /// `sd_noise_schedule` option (None: the model's config), `random_seed` the seed for -1.
    pub fn resolve(
        self,
        limits: &Limits,
        noise_schedule: Option<bool>,
        random_seed: u64,
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
        let zero_snr = match (self.zero_snr, overrides.get("sd_noise_schedule")) {
            (Some(z), _) => Some(z),
            (None, None | Some(Value::Null)) => noise_schedule,
            (None, Some(v)) => Some(parse_noise_schedule(v, "override_settings.sd_noise_schedule")?),
        };
        let (sampler, suffix_sigmas) = match self.sampler_name.or(self.sampler_index) {
            None => (Sampler::Ddim, None),
            Some(name) => parse_sampler(&name).ok_or_else(|| {
                let names: Vec<&str> = Sampler::ALL.iter().map(|s| s.a1111_name()).collect();
                ApiError::invalid(format!(
                    "sampler_name: unknown sampler {name:?}; expected one of {}",
                    names.join(", ")
                ))
            })?,
        };
        let sigmas = match self.scheduler.as_deref() {
            None => suffix_sigmas.unwrap_or_default(),
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
        let spacing = match self.spacing.as_deref() {
            None => DEFAULT_SPACING,
            Some(s) => s
                .parse::<TimestepSpacing>()
                .map_err(|e| ApiError::invalid(format!("spacing: {e}")))?,
        };
        let steps = self.steps.unwrap_or(DEFAULT_STEPS);
        if steps == 0 || steps > limits.max_steps {
            return Err(ApiError::invalid(format!(
                "steps: {steps} must be between 1 and {} (the server's --max-steps)",
                limits.max_steps
            )));
        }
        let width = check_side("width", self.width)?;
        let height = check_side("height", self.height)?;
        if let (Some(w), Some(h)) = (width, height) {
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
        let seed = match self.seed {
            None | Some(RANDOM_SEED) => random_seed,
            Some(s) if s < 0 => {
                return Err(ApiError::invalid(format!(
                    "seed: {s} must be -1 (random) or at least 0"
                )))
            }
            Some(s) => s as u64,
        };
        let request = Request {
            negative_prompt: self.negative_prompt.unwrap_or_default(),
            seed,
            num_images: Some(batch_size * n_iter),
            steps,
            guidance: self.cfg_scale.unwrap_or(DEFAULT_GUIDANCE),
            guidance_rescale: self.guidance_rescale.unwrap_or(DEFAULT_GUIDANCE_RESCALE),
            spacing,
            zero_snr,
            // A1111's `eta` is DDIM's and the ancestral samplers'; only DDIM takes one here.
            eta: if sampler == Sampler::Ddim {
                self.eta.unwrap_or(0.0)
            } else {
                0.0
            },
            sampler,
            sigmas,
            width,
            height,
            ..Request::new(&self.prompt.unwrap_or_default())
        };
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

/// The engine's messages name command-line flags; a client sees the request fields instead.
const FLAG_FIELDS: [(&str, &str); 15] = [
    ("--strength", "denoising_strength"),
    ("--init-image", "init_images"),
    ("--mask-blur", "mask_blur"),
    ("--mask", "mask"),
    ("--resize", "resize_mode"),
    ("--guidance-rescale", "guidance_rescale"),
    ("--guidance", "cfg_scale"),
    ("--steps", "steps"),
    ("--width", "width"),
    ("--height", "height"),
    ("--eta", "eta"),
    ("--no-zero-snr", "zero_snr: false"),
    ("--zero-snr", "zero_snr"),
    ("--spacing", "spacing"),
    ("--sampler", "sampler_name"),
];

/// An engine error about a request, with flag names turned into field names.
pub fn field_names(message: &str) -> String {
    FLAG_FIELDS
        .iter()
        .fold(message.to_string(), |m, (flag, field)| m.replace(flag, field))
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

    fn limits() -> Limits {
        Limits {
            max_pixels: 512 * 512,
            max_steps: 150,
            max_batch: 4,
            queue: 4,
        }
    }

    fn resolve(body: Value) -> Result<Resolved, ApiError> {
        let request: Txt2Img = serde_json::from_value(body).unwrap();
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

    #[test]
    fn engine_messages_name_fields() {
        assert_eq!(
            field_names("--height 40 must be a positive multiple of 64"),
            "height 40 must be a positive multiple of 64"
        );
        assert_eq!(
            field_names("--guidance-rescale 2 must be within 0..1"),
            "guidance_rescale 2 must be within 0..1"
        );
        assert_eq!(
            field_names("--guidance -1 must not be negative"),
            "cfg_scale -1 must not be negative"
        );
    }

    #[test]
    fn data_urls_lose_their_prefix() {
        assert_eq!(strip_data_url("data:image/png;base64,iVBOR"), "iVBOR");
        assert_eq!(strip_data_url("iVBOR"), "iVBOR");
    }
}
