//! The noise schedule and the sampling timesteps: plain f64 data made by pure functions, no
//! tensors, no device (Lin et al. 2024, Sections 3.1 and 3.3).
//!
//! [`NoiseSchedule`] is what the model was trained with (betas, optionally rescaled to zero
//! terminal SNR); [`Schedule`] adds the timesteps a sampler visits. The only place a schedule meets
//! a tensor is the sampler's step, which reads `alpha_bar` of the current and the next timestep.

pub mod betas;
pub mod sigmas;
pub mod spacing;
pub mod terminal;
pub mod zero_snr;

use anyhow::{bail, ensure, Result};

pub use betas::BetaSchedule;
pub use sigmas::{SigmaRange, SigmaSchedule};
pub use spacing::TimestepSpacing;
pub use terminal::TerminalAlphaBar;

/// Signal-to-noise ratio of the noisy input at a timestep: alpha_bar / (1 - alpha_bar)
/// (Lin et al. 2024, eq. 2). It is 0 where alpha_bar = 0 and infinite where alpha_bar = 1.
pub fn snr(alpha_bar: f64) -> f64 {
    alpha_bar / (1.0 - alpha_bar)
}

/// Stable Diffusion 1.x/2.x's training schedule, as their `scheduler_config.json` files say.
pub mod stable_diffusion {
    use super::BetaSchedule;

    pub const BETA_SCHEDULE: BetaSchedule = BetaSchedule::ScaledLinear;
    pub const BETA_START: f64 = 0.00085;
    pub const BETA_END: f64 = 0.012;
    pub const TRAIN_TIMESTEPS: usize = 1000;
    pub const STEPS_OFFSET: usize = 1;
    pub const SET_ALPHA_TO_ONE: bool = false;
}

/// Where the betas come from: a named schedule over a beta range, or explicit `trained_betas`.
#[derive(Debug, Clone, PartialEq)]
pub enum BetaSource {
    Named {
        schedule: BetaSchedule,
        beta_start: f64,
        beta_end: f64,
        train_timesteps: usize,
    },
    /// `trained_betas` of a scheduler config: used as they are, one per training timestep.
    Explicit(Vec<f64>),
}

impl BetaSource {
    /// Stable Diffusion 1.x/2.x: scaled_linear from 0.00085 to 0.012 over 1000 steps.
    pub const STABLE_DIFFUSION: BetaSource = BetaSource::Named {
        schedule: stable_diffusion::BETA_SCHEDULE,
        beta_start: stable_diffusion::BETA_START,
        beta_end: stable_diffusion::BETA_END,
        train_timesteps: stable_diffusion::TRAIN_TIMESTEPS,
    };

    pub fn train_timesteps(&self) -> usize {
        match self {
            Self::Named { train_timesteps, .. } => *train_timesteps,
            Self::Explicit(betas) => betas.len(),
        }
    }

    /// The stock betas, checked: at least 2 timesteps, 0 < beta < 1 (beta = 1 allowed last, as in
    /// a schedule that is already zero-SNR), beta_start < beta_end for ranged schedules.
    pub fn betas(&self) -> Result<Vec<f64>> {
        let betas = match self {
            Self::Named {
                schedule,
                beta_start,
                beta_end,
                train_timesteps,
            } => {
                ensure!(
                    *train_timesteps >= 2,
                    "num_train_timesteps must be at least 2, got {train_timesteps}"
                );
                if schedule.uses_beta_range() {
                    ensure!(
                        *beta_start > 0.0 && beta_start < beta_end && *beta_end < 1.0,
                        "beta_start ({beta_start}) and beta_end ({beta_end}) must satisfy 0 < beta_start < beta_end < 1"
                    );
                }
                betas::betas(*schedule, *beta_start, *beta_end, *train_timesteps)
            }
            Self::Explicit(betas) => {
                ensure!(
                    betas.len() >= 2,
                    "trained_betas must hold at least 2 values, got {}",
                    betas.len()
                );
                betas.clone()
            }
        };
        let last = betas.len() - 1;
        for (t, beta) in betas.iter().enumerate() {
            let upper_ok = *beta < 1.0 || (t == last && *beta == 1.0);
            ensure!(
                *beta > 0.0 && upper_ok,
                "beta at timestep {t} is {beta}; betas must lie in (0, 1)"
            );
        }
        Ok(betas)
    }
}

/// What the model was trained with: alpha_bar for every training timestep.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    /// alpha_bar_t for t in 0..T, decreasing; 0 at T - 1 when rescaled to zero terminal SNR.
    pub alphas_cumprod: Vec<f64>,
}

impl NoiseSchedule {
    /// Builds alpha_bar from `source`, rescaled by Algorithm 1 when `zero_terminal_snr`.
    pub fn new(source: &BetaSource, zero_terminal_snr: bool) -> Result<Self> {
        let stock = source.betas()?;
        let betas = if zero_terminal_snr {
            zero_snr::rescale_zero_terminal_snr(&stock)
        } else {
            stock
        };
        Ok(Self {
            alphas_cumprod: betas::alphas_cumprod(&betas),
        })
    }

    pub fn train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// SNR at the last training timestep: 0 exactly for a zero-SNR schedule.
    pub fn terminal_snr(&self) -> f64 {
        self.alphas_cumprod.last().map_or(0.0, |&a| snr(a))
    }
}

/// Everything needed to build a [`Schedule`]; field names follow diffusers' scheduler config.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleSpec {
    pub betas: BetaSource,
    pub zero_terminal_snr: bool,
    pub spacing: TimestepSpacing,
    pub steps: usize,
    /// Added to every `leading` timestep (SD's configs say 1); ignored by the other spacings, as
    /// in diffusers.
    pub steps_offset: usize,
    /// Whether alpha_bar "after" the last step is 1 (diffusers' `set_alpha_to_one`) or alpha_bar_0.
    pub set_alpha_to_one: bool,
}

/// A noise schedule plus the timesteps a sampler visits, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub noise: NoiseSchedule,
    /// Sampling timesteps, strictly decreasing, within [0, T - 1].
    pub timesteps: Vec<usize>,
    /// alpha_bar used as "previous" after the last timestep (1.0 or alpha_bar_0).
    pub final_alpha_cumprod: f64,
    /// Per step, alpha_bar and the fractional timestep the model is given, where the steps are
    /// not the listed timesteps' own (`--sigmas karras|exponential`, [`Schedule::with_sigmas`]);
    /// `timesteps` then holds them rounded.
    pub continuous: Option<Vec<(f64, f64)>>,
}

impl Schedule {
    pub fn new(spec: &ScheduleSpec) -> Result<Self> {
        let noise = NoiseSchedule::new(&spec.betas, spec.zero_terminal_snr)?;
        let train_timesteps = noise.train_timesteps();
        if spec.steps == 0 || spec.steps > train_timesteps {
            bail!(
                "steps must be between 1 and the {train_timesteps} training timesteps, got {}",
                spec.steps
            );
        }
        let timesteps = spacing::timesteps(spec.spacing, spec.steps, train_timesteps, spec.steps_offset);
        if let Some(&first) = timesteps.first() {
            ensure!(
                first < train_timesteps,
                "steps_offset {} moves the first {} timestep to {first}, past the last training timestep {}",
                spec.steps_offset,
                spec.spacing,
                train_timesteps - 1
            );
        }
        let final_alpha_cumprod = if spec.set_alpha_to_one {
            1.0
        } else {
            noise.alphas_cumprod[0]
        };
        Ok(Self {
            noise,
            timesteps,
            final_alpha_cumprod,
            continuous: None,
        })
    }

    /// The same schedule sampled at `kind`'s noise levels instead of its timesteps' (one per
    /// step), the ramp between sigma(t = 0) and sigma(T) as in k-diffusion:
    /// `with_sigma_ramp(kind, SigmaRange::Model)`.
    pub fn with_sigmas(self, kind: SigmaSchedule) -> Result<Self> {
        self.with_sigma_ramp(kind, SigmaRange::Model)
    }

    /// The same schedule sampled at `kind`'s noise levels instead of its timesteps' (one per
    /// step), the ramp's ends chosen by `range` ([`SigmaRange`]: the model's whole range, or the
    /// first and last of [`Self::timesteps`] as diffusers' `EulerDiscreteScheduler` does);
    /// [`SigmaSchedule::Schedule`] leaves it as it is. Call it on the full step list, before
    /// [`Self::skip_steps`] (img2img's start is a step of the full ramp, as in diffusers). Needs a
    /// finite sigma_max: clamp a zero-SNR schedule first ([`Self::with_terminal_alpha_bar`]).
    pub fn with_sigma_ramp(mut self, kind: SigmaSchedule, range: SigmaRange) -> Result<Self> {
        if kind == SigmaSchedule::Schedule {
            return Ok(self);
        }
        ensure!(
            self.continuous.is_none(),
            "the schedule already has --sigmas noise levels"
        );
        let steps = sigmas::steps(kind, range, &self.noise.alphas_cumprod, &self.timesteps)?;
        self.timesteps = steps.iter().map(|&(_, t)| t.round() as usize).collect();
        self.continuous = Some(steps);
        Ok(self)
    }

    /// The same schedule without its first `skip` steps: img2img's start part-way down
    /// (diffusers' `timesteps[t_start * order:]` with `set_begin_index`). Step `index` of the
    /// result is step `skip + index` of this one, noise levels (`--sigmas`) included.
    pub fn skip_steps(mut self, skip: usize) -> Result<Self> {
        ensure!(
            skip < self.timesteps.len(),
            "cannot skip {skip} of {} steps: at least one must remain",
            self.timesteps.len()
        );
        self.timesteps.drain(..skip);
        if let Some(steps) = &mut self.continuous {
            steps.drain(..skip);
        }
        Ok(self)
    }

    /// The timestep the model is given at sampling step `index` (fractional with `--sigmas`).
    pub fn model_timestep(&self, index: usize) -> f64 {
        match &self.continuous {
            Some(steps) => steps[index].1,
            None => self.timesteps[index] as f64,
        }
    }

    /// The same schedule with alpha_bar_T replaced by `terminal` when it is 0 (a zero-SNR
    /// schedule), so that sdfix can reproduce tools that cannot sample from alpha_bar_T = 0
    /// ([`terminal`]); [`TerminalAlphaBar::Exact`] and stock schedules are left as they are.
    pub fn with_terminal_alpha_bar(mut self, terminal: TerminalAlphaBar) -> Self {
        if let Some(last) = self.noise.alphas_cumprod.last_mut() {
            if *last == 0.0 {
                *last = terminal.value();
            }
        }
        self
    }

    /// alpha_bar at sampling step `index` (timestep `self.timesteps[index]`).
    pub fn alpha_cumprod(&self, index: usize) -> f64 {
        match &self.continuous {
            Some(steps) => steps[index].0,
            None => self.noise.alphas_cumprod[self.timesteps[index]],
        }
    }

    /// alpha_bar of the step after `index`, or 1 (sigma = 0) after the last: where the non-DDIM
    /// samplers go, as k-diffusion and diffusers' `final_sigmas_type="zero"` do.
    pub fn next_alpha_cumprod_or_one(&self, index: usize) -> f64 {
        if index + 1 < self.timesteps.len() {
            self.alpha_cumprod(index + 1)
        } else {
            1.0
        }
    }

    /// alpha_bar of the step the sampler moves to from step `index`: that of the next timestep in
    /// this list, or [`Self::final_alpha_cumprod`] after the last.
    ///
    /// diffusers uses `t - T / n` instead, which is a timestep the sampler never visits for
    /// `linspace`, and for `trailing` when n does not divide T; for the other cases both agree.
    pub fn prev_alpha_cumprod(&self, index: usize) -> f64 {
        if index + 1 < self.timesteps.len() {
            self.alpha_cumprod(index + 1)
        } else {
            self.final_alpha_cumprod
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(spacing: TimestepSpacing, steps: usize) -> ScheduleSpec {
        ScheduleSpec {
            betas: BetaSource::STABLE_DIFFUSION,
            zero_terminal_snr: true,
            spacing,
            steps,
            steps_offset: 1,
            set_alpha_to_one: false,
        }
    }

    #[test]
    fn stable_diffusion_terminal_snr_is_about_0_0047() {
        // The paper's Table 1 value for SD's schedule.
        let noise = NoiseSchedule::new(&BetaSource::STABLE_DIFFUSION, false).unwrap();
        assert!(
            (noise.terminal_snr() - 0.004682).abs() < 1e-5,
            "{}",
            noise.terminal_snr()
        );
        let fixed = NoiseSchedule::new(&BetaSource::STABLE_DIFFUSION, true).unwrap();
        assert_eq!(fixed.terminal_snr(), 0.0);
    }

    #[test]
    fn prev_alpha_is_next_timestep_then_final() {
        let s = Schedule::new(&spec(TimestepSpacing::Trailing, 7)).unwrap();
        assert_eq!(s.prev_alpha_cumprod(0), s.noise.alphas_cumprod[s.timesteps[1]]);
        assert_eq!(s.prev_alpha_cumprod(6), s.noise.alphas_cumprod[0]);
    }

    #[test]
    fn skipping_steps_keeps_the_rest_as_they_were() {
        let full = Schedule::new(&spec(TimestepSpacing::Trailing, 10))
            .unwrap()
            .with_terminal_alpha_bar(TerminalAlphaBar::Comfy)
            .with_sigmas(SigmaSchedule::Karras)
            .unwrap();
        let rest = full.clone().skip_steps(4).unwrap();
        assert_eq!(rest.timesteps, full.timesteps[4..]);
        for index in 0..6 {
            assert_eq!(rest.alpha_cumprod(index), full.alpha_cumprod(index + 4));
            assert_eq!(rest.model_timestep(index), full.model_timestep(index + 4));
            assert_eq!(rest.prev_alpha_cumprod(index), full.prev_alpha_cumprod(index + 4));
        }
        assert!(full.skip_steps(10).is_err());
    }

    /// `with_sigmas` is the k-diffusion range; `spacing` follows the spaced timesteps' ends
    /// (diffusers' Euler: trailing 10 steps of the stock schedule end at t = 99), and the ramp
    /// replaces the step list once.
    #[test]
    fn sigma_ramp_ends_follow_the_range() {
        let stock = ScheduleSpec {
            zero_terminal_snr: false,
            ..spec(TimestepSpacing::Trailing, 10)
        };
        let base = Schedule::new(&stock).unwrap();
        let model = base
            .clone()
            .with_sigma_ramp(SigmaSchedule::Karras, SigmaRange::Model)
            .unwrap();
        assert_eq!(model, base.clone().with_sigmas(SigmaSchedule::Karras).unwrap());
        assert_eq!(model.timesteps[9], 0);
        let spacing = base
            .clone()
            .with_sigma_ramp(SigmaSchedule::Karras, SigmaRange::Spacing)
            .unwrap();
        assert_eq!((spacing.timesteps[0], spacing.timesteps[9]), (999, 99));
        assert!((spacing.alpha_cumprod(9) - base.noise.alphas_cumprod[99]).abs() < 1e-12);
        assert!((spacing.model_timestep(9) - 99.0).abs() < 1e-9);
        assert_eq!(
            base.clone()
                .with_sigma_ramp(SigmaSchedule::Schedule, SigmaRange::Spacing)
                .unwrap(),
            base
        );
        assert!(model
            .with_sigma_ramp(SigmaSchedule::Karras, SigmaRange::Spacing)
            .is_err());
    }

    #[test]
    fn steps_out_of_range_are_errors() {
        assert!(Schedule::new(&spec(TimestepSpacing::Trailing, 0)).is_err());
        assert!(Schedule::new(&spec(TimestepSpacing::Trailing, 1001)).is_err());
        // leading with 1000 steps and offset 1 would visit t = 1000.
        assert!(Schedule::new(&spec(TimestepSpacing::Leading, 1000)).is_err());
    }

    #[test]
    fn reversed_beta_range_is_an_error() {
        let source = BetaSource::Named {
            schedule: BetaSchedule::Linear,
            beta_start: 0.02,
            beta_end: 0.0001,
            train_timesteps: 1000,
        };
        let err = NoiseSchedule::new(&source, false).unwrap_err().to_string();
        assert!(err.contains("beta_start"), "{err}");
    }
}
