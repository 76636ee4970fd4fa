//! `--sigmas`: where the sampling steps sit on the noise scale.
//!
//! `schedule` (the default) samples at the model's own timesteps, spread by `--spacing`. `karras`
//! (Karras et al. 2022, eq. 5, rho = 7) and `exponential` (evenly spaced in log sigma) instead
//! place n noise levels between sigma_min and sigma_max, in k-diffusion's sigma =
//! sqrt((1 - a) / a), and give the model the fractional timestep of each level, interpolated in
//! log sigma between the two training timesteps around it (k-diffusion's `sigma_to_t`, diffusers'
//! `_sigma_to_t`). Where the ramp ends is [`SigmaRange`]'s choice (`--sigma-range`): by default
//! sigma_min is sigma at t = 0 and sigma_max at t = T, as in k-diffusion, ComfyUI, AUTOMATIC1111
//! and diffusers' DPM-Solver and UniPC schedulers; [`SigmaRange::Spacing`] takes them from the
//! first and last timesteps of `--spacing`, as diffusers' `EulerDiscreteScheduler` does. Both need
//! a finite sigma_max, which a zero-SNR schedule does not have at t = T: the caller clamps
//! alpha_bar_T first (`--terminal-alpha-bar`).

use std::fmt;
use std::str::FromStr;

use anyhow::{ensure, Result};

/// Karras et al. 2022's rho (eq. 5 and Table 1: "rho = 7"), as k-diffusion and diffusers use.
pub const KARRAS_RHO: f64 = 7.0;

/// `--sigmas`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SigmaSchedule {
    /// The timesteps of `--spacing`, at their own alpha_bar.
    #[default]
    Schedule,
    /// Karras et al. 2022: evenly spaced in sigma^(1/rho).
    Karras,
    /// Evenly spaced in log sigma.
    Exponential,
}

impl SigmaSchedule {
    pub fn name(self) -> &'static str {
        match self {
            Self::Schedule => "schedule",
            Self::Karras => "karras",
            Self::Exponential => "exponential",
        }
    }
}

impl fmt::Display for SigmaSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SigmaSchedule {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "schedule" => Ok(Self::Schedule),
            "karras" => Ok(Self::Karras),
            "exponential" => Ok(Self::Exponential),
            other => Err(format!(
                "unknown sigma schedule {other:?}; expected schedule, karras or exponential"
            )),
        }
    }
}

/// `--sigma-range`: which noise levels a Karras or exponential ramp runs between.
///
/// The tools disagree. k-diffusion (`get_sigmas_karras(n, model.sigma_min, model.sigma_max)`),
/// ComfyUI, AUTOMATIC1111 and diffusers' DPM-Solver/UniPC schedulers use the model's whole range,
/// sigma(t = 0) to sigma(T). diffusers' `EulerDiscreteScheduler` (and the Heun, LMS and DPM2
/// schedulers that copy its `_convert_to_karras`) instead interpolates sigma at the spaced
/// timesteps and takes `in_sigmas[0]` and `in_sigmas[-1]`, unless its `sigma_max` / `sigma_min`
/// config is set: the ramp then depends on `--spacing` and the step count (trailing with 10 steps
/// ends at sigma(t = 99), not sigma(t = 0)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SigmaRange {
    /// sigma(t = 0) to sigma(T): k-diffusion, ComfyUI, AUTOMATIC1111.
    #[default]
    Model,
    /// sigma of the last to sigma of the first spaced timestep: diffusers' Euler defaults.
    Spacing,
}

impl SigmaRange {
    pub fn name(self) -> &'static str {
        match self {
            Self::Model => "model",
            Self::Spacing => "spacing",
        }
    }
}

impl fmt::Display for SigmaRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SigmaRange {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "model" => Ok(Self::Model),
            "spacing" => Ok(Self::Spacing),
            other => Err(format!("unknown sigma range {other:?}; expected model or spacing")),
        }
    }
}

/// k-diffusion's sigma = sqrt((1 - a) / a) of alpha_bar `a` (infinite at a = 0).
pub fn sigma(alpha_bar: f64) -> f64 {
    ((1.0 - alpha_bar) / alpha_bar).sqrt()
}

/// alpha_bar = 1 / (1 + sigma^2) of a k-diffusion sigma.
pub fn alpha_bar(sigma: f64) -> f64 {
    1.0 / (1.0 + sigma * sigma)
}

/// n noise levels from `sigma_max` down to `sigma_min`, decreasing (none for
/// [`SigmaSchedule::Schedule`], whose levels are its timesteps').
pub fn sigmas(kind: SigmaSchedule, sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let ramp = |i: usize| if n > 1 { i as f64 / (n - 1) as f64 } else { 0.0 };
    match kind {
        SigmaSchedule::Schedule => Vec::new(),
        SigmaSchedule::Karras => {
            let (lo, hi) = (sigma_min.powf(1.0 / KARRAS_RHO), sigma_max.powf(1.0 / KARRAS_RHO));
            (0..n).map(|i| (hi + ramp(i) * (lo - hi)).powf(KARRAS_RHO)).collect()
        }
        SigmaSchedule::Exponential => {
            let (lo, hi) = (sigma_min.ln(), sigma_max.ln());
            (0..n).map(|i| (hi + ramp(i) * (lo - hi)).exp()).collect()
        }
    }
}

/// The fractional training timestep of noise level `sigma`: linear in log sigma between the two
/// training timesteps around it, clamped to [0, T - 1] (k-diffusion's `sigma_to_t`).
pub fn sigma_to_t(sigma: f64, alphas_cumprod: &[f64]) -> f64 {
    let log_sigma = sigma.ln();
    let log_sigmas: Vec<f64> = alphas_cumprod.iter().map(|&a| self::sigma(a).ln()).collect();
    let last = log_sigmas.len() - 1;
    // The last training timestep whose log sigma is at most ours (log sigma increases with t).
    let low = log_sigmas
        .iter()
        .rposition(|&l| l <= log_sigma)
        .unwrap_or(0)
        .min(last - 1);
    let (l0, l1) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((l0 - log_sigma) / (l0 - l1)).clamp(0.0, 1.0);
    low as f64 + w
}

/// The steps of `kind` for a schedule of `alphas_cumprod` (all T values) sampled at `timesteps`
/// (the spaced list, decreasing; one step per entry): (alpha_bar, fractional timestep) per step,
/// the ramp's ends chosen by `range`. The ramp's sigma_max must be finite: alpha_bar_T > 0 for
/// [`SigmaRange::Model`], alpha_bar of the first spaced timestep > 0 for [`SigmaRange::Spacing`].
pub fn steps(
    kind: SigmaSchedule,
    range: SigmaRange,
    alphas_cumprod: &[f64],
    timesteps: &[usize],
) -> Result<Vec<(f64, f64)>> {
    let t_max = alphas_cumprod.len() - 1;
    // The timesteps of sigma_max and sigma_min.
    let (t_hi, t_lo) = match range {
        SigmaRange::Model => (t_max, 0),
        SigmaRange::Spacing => match (timesteps.first(), timesteps.last()) {
            (Some(&first), Some(&last)) => (first, last),
            _ => return Ok(Vec::new()),
        },
    };
    ensure!(
        t_lo <= t_hi && t_hi <= t_max,
        "--sigma-range {range}: timesteps {t_hi}..{t_lo} are not a decreasing list within 0..{t_max}"
    );
    let (a_lo, a_hi) = (alphas_cumprod[t_lo], alphas_cumprod[t_hi]);
    ensure!(
        a_hi > 0.0,
        "--sigmas {kind} needs a finite sigma_max; with zero terminal SNR pass --terminal-alpha-bar comfy or diffusers"
    );
    Ok(sigmas(kind, sigma(a_lo), sigma(a_hi), timesteps.len())
        .into_iter()
        .map(|s| (alpha_bar(s), sigma_to_t(s, alphas_cumprod)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::{BetaSource, NoiseSchedule};

    #[test]
    fn ramps_run_from_sigma_max_to_sigma_min() {
        for kind in [SigmaSchedule::Karras, SigmaSchedule::Exponential] {
            let s = sigmas(kind, 0.03, 14.6, 10);
            assert!(
                (s[0] - 14.6).abs() < 1e-9 && (s[9] - 0.03).abs() < 1e-12,
                "{kind}: {s:?}"
            );
            assert!(s.windows(2).all(|w| w[0] > w[1]), "{kind}: {s:?}");
        }
        // Karras spends more of its steps at low noise than the exponential ramp.
        let (k, e) = (
            sigmas(SigmaSchedule::Karras, 0.03, 14.6, 10),
            sigmas(SigmaSchedule::Exponential, 0.03, 14.6, 10),
        );
        assert!(k[5] > e[5]);
    }

    #[test]
    fn sigma_to_t_inverts_the_training_sigmas() {
        let a = NoiseSchedule::new(&BetaSource::STABLE_DIFFUSION, false)
            .unwrap()
            .alphas_cumprod;
        for t in [0usize, 1, 250, 998, 999] {
            assert!((sigma_to_t(sigma(a[t]), &a) - t as f64).abs() < 1e-9, "t = {t}");
        }
        let mid = (sigma(a[500]).ln() + sigma(a[501]).ln()) / 2.0;
        assert!((sigma_to_t(mid.exp(), &a) - 500.5).abs() < 1e-9);
    }

    #[test]
    fn zero_snr_without_a_clamp_is_refused() {
        let a = NoiseSchedule::new(&BetaSource::STABLE_DIFFUSION, true)
            .unwrap()
            .alphas_cumprod;
        let trailing: Vec<usize> = (0..10).map(|k| 999 - 100 * k).collect();
        for range in [SigmaRange::Model, SigmaRange::Spacing] {
            let err = steps(SigmaSchedule::Karras, range, &a, &trailing)
                .unwrap_err()
                .to_string();
            assert!(err.contains("--terminal-alpha-bar"), "{range}: {err}");
        }
        // A spacing that never visits t = T has a finite sigma_max of its own.
        let leading: Vec<usize> = (0..10).map(|k| 901 - 100 * k).collect();
        assert!(steps(SigmaSchedule::Karras, SigmaRange::Spacing, &a, &leading).is_ok());
    }

    /// `model` spans sigma(t = 0)..sigma(T) whatever the spacing (k-diffusion); `spacing` spans
    /// the spaced timesteps' own sigmas (diffusers' Euler: trailing 10 steps ends at t = 99), and
    /// gives the model those timesteps exactly at the ends.
    #[test]
    fn the_range_picks_the_ramp_ends() {
        let a = NoiseSchedule::new(&BetaSource::STABLE_DIFFUSION, false)
            .unwrap()
            .alphas_cumprod;
        let trailing: Vec<usize> = (0..10).map(|k| 999 - 100 * k).collect();
        for kind in [SigmaSchedule::Karras, SigmaSchedule::Exponential] {
            let model = steps(kind, SigmaRange::Model, &a, &trailing).unwrap();
            let spacing = steps(kind, SigmaRange::Spacing, &a, &trailing).unwrap();
            assert_eq!((model.len(), spacing.len()), (10, 10));
            assert!(
                (model[9].0 - a[0]).abs() < 1e-12 && model[9].1.abs() < 1e-9,
                "{kind}: {model:?}"
            );
            assert!((spacing[9].0 - a[99]).abs() < 1e-12, "{kind}: {spacing:?}");
            assert!((spacing[9].1 - 99.0).abs() < 1e-9, "{kind}: {spacing:?}");
            for ramp in [&model, &spacing] {
                assert!((ramp[0].0 - a[999]).abs() < 1e-12 && (ramp[0].1 - 999.0).abs() < 1e-9);
            }
        }
        // leading (offset 1) starts below T: only `spacing` follows it.
        let leading: Vec<usize> = (0..10).map(|k| 901 - 100 * k).collect();
        let spacing = steps(SigmaSchedule::Karras, SigmaRange::Spacing, &a, &leading).unwrap();
        assert!((spacing[0].1 - 901.0).abs() < 1e-9 && (spacing[9].1 - 1.0).abs() < 1e-9);
        let model = steps(SigmaSchedule::Karras, SigmaRange::Model, &a, &leading).unwrap();
        assert!((model[0].1 - 999.0).abs() < 1e-9);
    }

    #[test]
    fn sigma_range_names_round_trip() {
        for range in [SigmaRange::Model, SigmaRange::Spacing] {
            assert_eq!(range.to_string().parse::<SigmaRange>(), Ok(range));
        }
        assert_eq!(SigmaRange::default(), SigmaRange::Model);
        assert_eq!(
            "x".parse::<SigmaRange>(),
            Err("unknown sigma range \"x\"; expected model or spacing".to_string())
        );
    }
}
