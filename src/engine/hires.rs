//! The hires fix as a request asks for it and as a job runs it: AUTOMATIC1111's txt2img
//! `enable_hr` (`processing.py` `StableDiffusionProcessingTxt2Img`). The picture is made at the
//! request's width x height (the first pass), upscaled (its latents by torch's
//! `F.interpolate`, or the decoded picture by Lanczos and encoded again), then sampled again as
//! img2img at the larger size (the second pass, `hires_pass`).
//!
//! What is A1111's here, and pinned by tests (tests/hires.rs):
//! - the size (`calculate_target_resolution`): a scale gives `int(w * scale)` x `int(h * scale)`;
//!   one resize side gives the other from the aspect ratio (`x * h // w`); both cover that box
//!   and the latents are cropped to it in the middle (`truncate_x/y`, sliced
//!   `[t // 2 : len - (t + 1) // 2]`). A1111's `opt_f` (8) is the VAE's factor here.
//! - the steps (`sd_samplers_common.setup_img2img_steps` with explicit steps): exactly S steps
//!   run (`hires_steps`, 0 = the first pass's), the last S of the sampler's schedule of
//!   N = int(S / min(d, 0.999)) steps, d the strength (A1111's `denoising_strength`);
//! - the noise: a generator seeded again with the image's seed (`rng.ImageRNG(shape_hr, seeds)`),
//!   so sdfix draws it from a fresh [`ImageNoise`](crate::sampling::noise::ImageNoise) of the
//!   seed at the hires size (its per-step noise too);
//! - SDXL's micro-conditioning in the second pass: A1111's `SdConditioning(width=hr_upscale_to_x,
//!   height=hr_upscale_to_y)`, the size before the crop (the final size unless both resize sides
//!   change the aspect ratio);
//! - the recorded values: `Size` is the first pass, then `Denoising strength`, `Hires upscale` or
//!   `Hires resize`, `Hires steps` when not 0, `Hires upscaler` (`output::metadata`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::field::{Field, RequestError};
use super::micro::{parse_width_x_height, PixelSize};
use crate::pipeline::SamplingSettings;
use crate::sampling::upscale::Interpolation;
use crate::sampling::Sampler;

/// The second pass's strength unless told otherwise (what A1111 clients send; A1111's own
/// dataclass default is 0.75).
pub const DEFAULT_HIRES_STRENGTH: f64 = 0.7;

/// A1111 clamps the strength below 1 when it divides by it, so that d = 1 runs the whole
/// schedule of S steps (`min(denoising_strength, 0.999)`).
const STRENGTH_CLAMP: f64 = 0.999;

/// How the first pass is enlarged (`--hires-upscaler`, A1111's `hr_upscaler`); A1111's default
/// is "Latent" (bilinear).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HiresUpscaler {
    /// The latents, by `F.interpolate` (A1111's "Latent ..." upscalers); "Latent" is bilinear.
    Latent(Interpolation),
    /// The decoded picture, by PIL's Lanczos resampling, then encoded again (A1111's "Lanczos").
    Lanczos,
}

impl Default for HiresUpscaler {
    fn default() -> Self {
        Self::A1111_DEFAULT
    }
}

impl HiresUpscaler {
    pub const ALL: [HiresUpscaler; 7] = [
        Self::Latent(Interpolation::Bilinear),
        Self::Latent(Interpolation::BilinearAntialias),
        Self::Latent(Interpolation::Bicubic),
        Self::Latent(Interpolation::BicubicAntialias),
        Self::Latent(Interpolation::Nearest),
        Self::Latent(Interpolation::NearestExact),
        Self::Lanczos,
    ];

    /// A1111's default upscaler ("Latent").
    pub const A1111_DEFAULT: HiresUpscaler = Self::Latent(Interpolation::Bilinear);

    /// sdfix's name (`--hires-upscaler`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Latent(Interpolation::Bilinear) => "latent",
            Self::Latent(Interpolation::BilinearAntialias) => "latent-antialiased",
            Self::Latent(Interpolation::Bicubic) => "latent-bicubic",
            Self::Latent(Interpolation::BicubicAntialias) => "latent-bicubic-antialiased",
            Self::Latent(Interpolation::Nearest) => "latent-nearest",
            Self::Latent(Interpolation::NearestExact) => "latent-nearest-exact",
            Self::Lanczos => "lanczos",
        }
    }

    /// A1111's name (`hr_upscaler`, the infotext's `Hires upscaler`).
    pub fn a1111_name(self) -> &'static str {
        match self {
            Self::Latent(Interpolation::Bilinear) => "Latent",
            Self::Latent(Interpolation::BilinearAntialias) => "Latent (antialiased)",
            Self::Latent(Interpolation::Bicubic) => "Latent (bicubic)",
            Self::Latent(Interpolation::BicubicAntialias) => "Latent (bicubic antialiased)",
            Self::Latent(Interpolation::Nearest) => "Latent (nearest)",
            Self::Latent(Interpolation::NearestExact) => "Latent (nearest-exact)",
            Self::Lanczos => "Lanczos",
        }
    }
}

impl fmt::Display for HiresUpscaler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HiresUpscaler {
    type Err = String;

    /// sdfix's names, and A1111's in any case ("Latent (bicubic antialiased)").
    fn from_str(s: &str) -> Result<Self, String> {
        let wanted = s.trim();
        Self::ALL
            .into_iter()
            .find(|u| u.name() == wanted || u.a1111_name().eq_ignore_ascii_case(wanted))
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|u| u.name()).collect();
                format!("unknown hires upscaler {s:?}; expected one of {}", names.join(", "))
            })
    }
}

/// `--hires-size WxH`, A1111's `hr_resize_x` x `hr_resize_y`: either side may be 0 (taken from
/// the first pass's aspect ratio), not both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HiresResize {
    pub width: usize,
    pub height: usize,
}

impl FromStr for HiresResize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match parse_width_x_height(s) {
            Some((width, height)) if width > 0 || height > 0 => Ok(Self { width, height }),
            _ => Err(format!(
                "{s:?} is not a hires size: write WIDTHxHEIGHT in pixels, e.g. 1024x1024, or 1024x0 to keep the \
                 aspect ratio"
            )),
        }
    }
}

impl fmt::Display for HiresResize {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

impl Serialize for HiresResize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HiresResize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// The hires fix a request asks for; all `None` is none. It runs when `scale` or `size` is set.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HiresFix {
    /// `--hires-scale`: the final size is int(w * scale) x int(h * scale).
    pub scale: Option<f64>,
    /// `--hires-size`: the final size (A1111's "Hires resize").
    pub size: Option<HiresResize>,
    /// [default: A1111's "Latent", bilinear].
    pub upscaler: Option<HiresUpscaler>,
    /// Steps of the second pass, 0 = the first pass's [default 0].
    pub steps: Option<usize>,
    /// A1111's `denoising_strength` of the second pass, in (0, 1] [default:
    /// [`DEFAULT_HIRES_STRENGTH`]].
    pub strength: Option<f64>,
    /// A1111's `hr_prompt`: the second pass's prompt [default: the first pass's].
    pub prompt: Option<String>,
    /// A1111's `hr_negative_prompt` [default: the first pass's].
    pub negative_prompt: Option<String>,
    /// A1111's `hr_sampler_name`: the second pass's sampler [default: the first pass's].
    pub sampler: Option<Sampler>,
}

impl HiresFix {
    /// Whether the request asks for a second pass.
    pub fn is_on(&self) -> bool {
        self.scale.is_some() || self.size.is_some()
    }

    /// The setting that is set, for "needs a hires size" errors.
    fn first_set_field(&self) -> Option<Field> {
        [
            (self.upscaler.is_some(), Field::HiresUpscaler),
            (self.steps.is_some(), Field::HiresSteps),
            (self.strength.is_some(), Field::HiresStrength),
            (self.prompt.is_some(), Field::HiresPrompt),
            (self.negative_prompt.is_some(), Field::HiresNegativePrompt),
            (self.sampler.is_some(), Field::HiresSampler),
        ]
        .into_iter()
        .find_map(|(set, field)| set.then_some(field))
    }
}

/// A1111's `calculate_target_resolution`, in pixels of a VAE with `factor`: the size the upscale
/// makes (`hr_upscale_to`) and how many latent rows and columns the crop then removes
/// (`truncate_x`, `truncate_y`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HiresTarget {
    pub upscale_to: PixelSize,
    pub truncate_x: usize,
    pub truncate_y: usize,
}

impl HiresTarget {
    /// Of a first pass `first` (px) by `scale` or `resize` (one of them set).
    pub fn new(first: PixelSize, scale: Option<f64>, resize: Option<HiresResize>, factor: usize) -> Self {
        let (w, h) = (first.width, first.height);
        let upscale = |width, height| PixelSize { width, height };
        match (resize, scale) {
            (Some(HiresResize { width: x, height: 0 }), _) => Self::uncropped(upscale(x, x * h / w)),
            (Some(HiresResize { width: 0, height: y }), _) => Self::uncropped(upscale(y * w / h, y)),
            (Some(HiresResize { width: x, height: y }), _) => {
                // Cover the box (compared as A1111 does, in floats), then crop to it.
                let to = if (w as f64 / h as f64) < (x as f64 / y as f64) {
                    upscale(x, x * h / w)
                } else {
                    upscale(y * w / h, y)
                };
                Self {
                    upscale_to: to,
                    truncate_x: to.width.saturating_sub(x) / factor,
                    truncate_y: to.height.saturating_sub(y) / factor,
                }
            }
            (None, scale) => {
                let s = scale.unwrap_or(1.0);
                Self::uncropped(upscale((w as f64 * s) as usize, (h as f64 * s) as usize))
            }
        }
    }

    fn uncropped(upscale_to: PixelSize) -> Self {
        Self {
            upscale_to,
            truncate_x: 0,
            truncate_y: 0,
        }
    }

    /// (h, w) of the upscaled latents, before the crop.
    pub fn upscaled_latents(&self, factor: usize) -> (usize, usize) {
        (self.upscale_to.height / factor, self.upscale_to.width / factor)
    }

    /// The crop of the upscaled latents: (top, left, height, width), A1111's
    /// `[t // 2 : len - (t + 1) // 2]` on each axis.
    pub fn crop(&self, factor: usize) -> (usize, usize, usize, usize) {
        let (h, w) = self.upscaled_latents(factor);
        (
            self.truncate_y / 2,
            self.truncate_x / 2,
            h.saturating_sub(self.truncate_y),
            w.saturating_sub(self.truncate_x),
        )
    }
}

/// The schedule length N whose last `steps` steps the second pass runs at `strength`:
/// int(S / min(d, 0.999)) (A1111's `setup_img2img_steps`).
pub fn schedule_steps(steps: usize, strength: f64) -> usize {
    (steps as f64 / strength.min(STRENGTH_CLAMP)) as usize
}

/// A job's second pass, resolved and checked.
#[derive(Debug, Clone)]
pub struct ResolvedHires {
    pub upscaler: HiresUpscaler,
    pub target: HiresTarget,
    /// (channels, height, width) of the second pass's latents (after the crop).
    pub latent_shape: (usize, usize, usize),
    /// S, the steps that run.
    pub steps: usize,
    pub strength: f64,
    /// The sampler's schedule of N steps cut to its last S, with the first pass's guidance and
    /// the second pass's sampler.
    pub settings: SamplingSettings,
    /// The second pass's own prompt, negative prompt and sampler where they differ from the first
    /// pass's (A1111's `Hires prompt`, `Hires negative prompt`, `Hires sampler`).
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
    pub sampler: Option<Sampler>,
}

impl ResolvedHires {
    /// The second pass's prompt and negative prompt, given the first pass's.
    pub fn prompts<'a>(&'a self, prompt: &'a str, negative_prompt: &'a str) -> (&'a str, &'a str) {
        (
            self.prompt.as_deref().unwrap_or(prompt),
            self.negative_prompt.as_deref().unwrap_or(negative_prompt),
        )
    }
}

/// Checks a request's hires settings against the first pass (`first`, px, and its prompt and
/// negative prompt) and the VAE `factor`; `schedule(n)` builds the request's sampling settings for
/// n steps. `None` without a hires fix.
pub(super) fn resolve(
    fix: &HiresFix,
    first_steps: usize,
    first: PixelSize,
    first_prompts: (&str, &str),
    (channels, factor): (usize, usize),
    is_img2img: bool,
    schedule: &dyn Fn(usize) -> Result<SamplingSettings, RequestError>,
) -> Result<Option<ResolvedHires>, RequestError> {
    let check = |ok: bool, field: Field, reason: &dyn Fn() -> String| {
        if ok {
            Ok(())
        } else {
            Err(RequestError::new(field, reason()))
        }
    };
    if !fix.is_on() {
        if let Some(field) = fix.first_set_field() {
            return Err(RequestError::new(
                field,
                "needs a second pass to act on: give {hires_scale} or {hires_size}",
            ));
        }
        return Ok(None);
    }
    let size_field = if fix.size.is_some() {
        Field::HiresSize
    } else {
        Field::HiresScale
    };
    check(fix.scale.is_none() || fix.size.is_none(), Field::HiresSize, &|| {
        "and {hires_scale} exclude each other: give one".to_string()
    })?;
    check(!is_img2img, size_field, &|| {
        "is a second pass of text to image (A1111's txt2img hires fix); it does not take {init_image}".to_string()
    })?;
    if let Some(scale) = fix.scale {
        check(scale.is_finite() && scale > 0.0, Field::HiresScale, &|| {
            format!("{scale} must be a positive number (2 doubles each side)")
        })?;
    }
    if let Some(size) = fix.size {
        for side in [size.width, size.height] {
            check(side.is_multiple_of(factor), Field::HiresSize, &|| {
                format!(
                    "{size}: {side} must be a multiple of {factor} (the VAE's factor), or 0 to keep the aspect ratio"
                )
            })?;
        }
    }
    let target = HiresTarget::new(first, fix.scale, fix.size, factor);
    let (_, _, h, w) = target.crop(factor);
    check(h > 0 && w > 0, size_field, &|| {
        format!(
            "makes {}x{} px from {first}, less than the VAE's {factor} px",
            target.upscale_to.width, target.upscale_to.height
        )
    })?;
    let strength = fix.strength.unwrap_or(DEFAULT_HIRES_STRENGTH);
    check(strength > 0.0 && strength <= 1.0, Field::HiresStrength, &|| {
        format!("{strength} must be within (0, 1]: 1 samples the upscaled picture again from noise, smaller values keep more of it")
    })?;
    let steps = match fix.steps.unwrap_or(0) {
        0 => first_steps,
        s => s,
    };
    let n = schedule_steps(steps, strength);
    let mut settings = schedule(n).map_err(|e| {
        RequestError::new(
            Field::HiresSteps,
            format!(
                "{steps} at {{hires_strength={strength}}} takes the last {steps} steps of a schedule of {n} \
                 (int({steps} / {})), which cannot be made: {}",
                strength.min(STRENGTH_CLAMP),
                e.reason
            ),
        )
    })?;
    settings.schedule = settings
        .schedule
        .skip_steps(n - steps)
        .map_err(|e| RequestError::new(Field::HiresSteps, format!("{e:#}")))?;
    // A1111: an empty `hr_prompt` / `hr_negative_prompt` is the first pass's, and so is
    // `hr_sampler_name` left out; only what differs is the second pass's own (and written).
    let (first_prompt, first_negative) = first_prompts;
    let own = |text: &Option<String>, first: &str| text.clone().filter(|t| !t.is_empty() && t != first);
    let sampler = fix.sampler.filter(|&s| s != settings.sampler);
    if let Some(sampler) = sampler {
        settings.sampler = sampler;
    }
    Ok(Some(ResolvedHires {
        upscaler: fix.upscaler.unwrap_or_default(),
        target,
        latent_shape: (channels, h, w),
        steps,
        strength,
        settings,
        prompt: own(&fix.prompt, first_prompt),
        negative_prompt: own(&fix.negative_prompt, first_negative),
        sampler,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(width: usize, height: usize) -> PixelSize {
        PixelSize { width, height }
    }

    /// Vectors from A1111's `calculate_target_resolution`, worked by hand.
    #[test]
    fn target_sizes_follow_a1111() {
        let t = |first, scale, resize: Option<&str>| {
            let t = HiresTarget::new(first, scale, resize.map(|r| r.parse().unwrap()), 8);
            (t.upscale_to.width, t.upscale_to.height, t.truncate_x, t.truncate_y)
        };
        assert_eq!(t(size(512, 512), Some(2.0), None), (1024, 1024, 0, 0));
        assert_eq!(t(size(512, 768), Some(1.5), None), (768, 1152, 0, 0));
        // int() truncates: 520 * 1.3 = 676.0000000000001 -> 676, 360 * 1.3 = 468.
        assert_eq!(t(size(520, 360), Some(1.3), None), (676, 468, 0, 0));
        assert_eq!(t(size(512, 768), None, Some("1024x0")), (1024, 1536, 0, 0));
        assert_eq!(t(size(768, 512), None, Some("0x1000")), (1500, 1000, 0, 0));
        // Both sides: cover, then crop in latent space.
        assert_eq!(t(size(512, 512), None, Some("1024x768")), (1024, 1024, 0, 32));
        assert_eq!(t(size(512, 768), None, Some("1024x1024")), (1024, 1536, 0, 64));
        assert_eq!(t(size(768, 512), None, Some("1000x1000")), (1500, 1000, 62, 0));
        let target = HiresTarget::new(size(512, 512), None, Some("1024x760".parse().unwrap()), 8);
        // truncate_y = 264 // 8 = 33: rows [16 : 128 - 17].
        assert_eq!(target.crop(8), (16, 0, 95, 128));
    }

    /// A1111's step rule: S = 20 at 0.7 runs the last 20 of 28 (int(28.57)); 1 runs S of S.
    #[test]
    fn the_schedule_is_int_s_over_d() {
        assert_eq!(schedule_steps(20, 0.7), 28);
        assert_eq!(schedule_steps(20, 1.0), 20);
        assert_eq!(schedule_steps(10, 0.5), 20);
        assert_eq!(schedule_steps(7, 0.7), 10);
    }

    #[test]
    fn names_of_both_tools() {
        for u in HiresUpscaler::ALL {
            assert_eq!(u.name().parse::<HiresUpscaler>(), Ok(u));
            assert_eq!(u.a1111_name().parse::<HiresUpscaler>(), Ok(u));
        }
        assert_eq!(
            "latent (Bicubic)".parse(),
            Ok(HiresUpscaler::Latent(Interpolation::Bicubic))
        );
        assert!("ESRGAN_4x"
            .parse::<HiresUpscaler>()
            .unwrap_err()
            .contains("latent-nearest-exact"));
        assert!("0x0".parse::<HiresResize>().is_err());
        assert_eq!("1024x0".parse(), Ok(HiresResize { width: 1024, height: 0 }));
    }
}
