//! The hires fix's fields of A1111's `/sdapi/v1/txt2img` body (`enable_hr`, `hr_*`,
//! `denoising_strength`), read into the engine's [`HiresFix`].

use serde::Deserialize;

use super::error::ApiError;
use super::names::parse_sampler;
use crate::engine::hires::{HiresFix, HiresResize, HiresUpscaler};
use crate::sampling::Sampler;
use crate::schedule::SigmaSchedule;

/// The hires fix's fields of A1111's txt2img body.
#[derive(Debug, Default, Deserialize)]
pub struct HiresFields {
    pub enable_hr: Option<bool>,
    pub hr_scale: Option<f64>,
    pub hr_resize_x: Option<usize>,
    pub hr_resize_y: Option<usize>,
    pub hr_upscaler: Option<String>,
    pub hr_second_pass_steps: Option<usize>,
    /// A1111's second-pass overrides: `hr_prompt` and `hr_negative_prompt` (empty: the first
    /// pass's), `hr_sampler_name` (null, empty or "Use same sampler": the first pass's; a name with
    /// a schedule suffix must name the first pass's schedule type). `hr_scheduler` and
    /// `hr_checkpoint_name` are accepted only when they ask for the first pass's (null, empty or
    /// "Use same ...") and refused otherwise, never ignored.
    pub hr_prompt: Option<String>,
    pub hr_negative_prompt: Option<String>,
    pub hr_sampler_name: Option<String>,
    pub hr_scheduler: Option<String>,
    pub hr_checkpoint_name: Option<String>,
}

/// A1111's `denoising_strength` default (its txt2img dataclass's).
pub(crate) const A1111_HIRES_STRENGTH: f64 = 0.75;
/// A1111's `hr_scale` default.
const A1111_HIRES_SCALE: f64 = 2.0;

impl HiresFields {
    /// The hires fix these fields ask for (none without `enable_hr`); `strength` is the body's
    /// `denoising_strength`. Also the schedule type `hr_sampler_name` names (`DPM++ 2M Karras`),
    /// which must be the first pass's.
    pub(super) fn fix(&self, strength: Option<f64>) -> Result<(HiresFix, Option<SigmaSchedule>), ApiError> {
        if self.enable_hr != Some(true) {
            return Ok((HiresFix::default(), None));
        }
        let same = |name: &&str| name.is_empty() || name.starts_with("Use same");
        let (sampler, sampler_sigmas) = match self.hr_sampler_name.as_deref().filter(|n| !same(n)) {
            None => (None, None),
            Some(name) => {
                let (sampler, sigmas) = parse_sampler(name).ok_or_else(|| {
                    let names: Vec<&str> = Sampler::ALL.iter().map(|s| s.a1111_name()).collect();
                    ApiError::invalid(format!(
                        "hr_sampler_name: unknown sampler {name:?}; expected \"Use same sampler\" or one of {}",
                        names.join(", ")
                    ))
                })?;
                (Some(sampler), sigmas)
            }
        };
        for (field, value) in [
            ("hr_scheduler", &self.hr_scheduler),
            ("hr_checkpoint_name", &self.hr_checkpoint_name),
        ] {
            if let Some(name) = value.as_deref().filter(|n| !same(n)) {
                return Err(ApiError::invalid(format!(
                    "{field}: {name:?}: the hires pass always uses the first pass's; leave it null or \"Use same\""
                )));
            }
        }
        let upscaler = match self.hr_upscaler.as_deref() {
            None => None,
            Some(name) if name.eq_ignore_ascii_case("none") => Some(HiresUpscaler::Lanczos),
            Some(name) => Some(name.parse::<HiresUpscaler>().map_err(|_| {
                let names: Vec<&str> = HiresUpscaler::ALL.iter().map(|u| u.a1111_name()).collect();
                ApiError::invalid(format!(
                    "hr_upscaler: {name:?} is not an upscaler sdfix has; expected one of {}",
                    names.join(", ")
                ))
            })?),
        };
        let (x, y) = (self.hr_resize_x.unwrap_or(0), self.hr_resize_y.unwrap_or(0));
        let (scale, size) = if x == 0 && y == 0 {
            (Some(self.hr_scale.unwrap_or(A1111_HIRES_SCALE)), None)
        } else {
            (None, Some(HiresResize { width: x, height: y }))
        };
        let fix = HiresFix {
            scale,
            size,
            upscaler,
            steps: self.hr_second_pass_steps,
            strength: Some(strength.unwrap_or(A1111_HIRES_STRENGTH)),
            prompt: self.hr_prompt.clone().filter(|p| !p.is_empty()),
            negative_prompt: self.hr_negative_prompt.clone().filter(|p| !p.is_empty()),
            sampler,
        };
        Ok((fix, sampler_sigmas))
    }
}
