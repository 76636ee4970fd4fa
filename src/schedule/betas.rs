//! Beta schedules, as diffusers defines them (`DDIMScheduler.__init__`).
//!
//! diffusers builds `linear` and `scaled_linear` with `torch.linspace` in f32 and
//! `squaredcos_cap_v2` in Python floats (Nichol & Dhariwal 2021, eq. 17). We compute everything in
//! f64; the results agree with diffusers' f32 tensors to f32 precision (pinned by
//! `tests/schedule_refs.rs`).
//!
//! candle-transformers' cosine schedule divides integers (`i / T` in usize) and so returns a
//! constant beta; we evaluate `alpha_bar_fn` at real-valued `t`, as diffusers does.

use std::fmt;
use std::str::FromStr;

/// The largest beta `squaredcos_cap_v2` may produce; diffusers' `max_beta` default. Without the cap
/// the last beta is 1.0 and the schedule destroys the signal in one step.
pub const COSINE_MAX_BETA: f64 = 0.999;

/// The offset `s` of the cosine schedule (Nichol & Dhariwal 2021, eq. 17), which keeps beta_1 from
/// being vanishingly small.
pub const COSINE_OFFSET: f64 = 0.008;

/// How betas go from `beta_start` to `beta_end` over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    /// Evenly spaced betas (DDPM, Ho et al. 2020).
    Linear,
    /// Evenly spaced sqrt(beta), squared: what Stable Diffusion 1.x and 2.x use.
    ScaledLinear,
    /// The cosine schedule of improved DDPM, betas capped at [`COSINE_MAX_BETA`]. Ignores
    /// `beta_start` and `beta_end`.
    SquaredCosCapV2,
}

impl BetaSchedule {
    /// The name diffusers uses in `scheduler_config.json`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Linear => "linear",
            Self::ScaledLinear => "scaled_linear",
            Self::SquaredCosCapV2 => "squaredcos_cap_v2",
        }
    }

    /// Whether the schedule reads `beta_start` and `beta_end`.
    pub fn uses_beta_range(self) -> bool {
        !matches!(self, Self::SquaredCosCapV2)
    }
}

impl fmt::Display for BetaSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BetaSchedule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "linear" => Ok(Self::Linear),
            "scaled_linear" => Ok(Self::ScaledLinear),
            "squaredcos_cap_v2" => Ok(Self::SquaredCosCapV2),
            other => Err(format!(
                "unknown beta schedule {other:?}; expected linear, scaled_linear or squaredcos_cap_v2"
            )),
        }
    }
}

/// `n` evenly spaced values from `start` to `end` inclusive, as `numpy.linspace`/`torch.linspace`
/// compute them (`start + i * step`, the last value set to `end` exactly).
pub(crate) fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    match n {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (end - start) / (n - 1) as f64;
            let mut values: Vec<f64> = (0..n).map(|i| start + i as f64 * step).collect();
            values[n - 1] = end;
            values
        }
    }
}

/// The betas of `schedule` over `train_timesteps` steps.
pub fn betas(schedule: BetaSchedule, beta_start: f64, beta_end: f64, train_timesteps: usize) -> Vec<f64> {
    match schedule {
        BetaSchedule::Linear => linspace(beta_start, beta_end, train_timesteps),
        BetaSchedule::ScaledLinear => linspace(beta_start.sqrt(), beta_end.sqrt(), train_timesteps)
            .into_iter()
            .map(|b| b * b)
            .collect(),
        BetaSchedule::SquaredCosCapV2 => cosine_betas(train_timesteps),
    }
}

/// Improved DDPM's cosine schedule: beta_i = 1 - alpha_bar((i+1)/T) / alpha_bar(i/T), capped.
fn cosine_betas(train_timesteps: usize) -> Vec<f64> {
    let alpha_bar = |t: f64| {
        ((t + COSINE_OFFSET) / (1.0 + COSINE_OFFSET) * std::f64::consts::FRAC_PI_2)
            .cos()
            .powi(2)
    };
    let total = train_timesteps as f64;
    (0..train_timesteps)
        .map(|i| {
            let t1 = i as f64 / total;
            let t2 = (i + 1) as f64 / total;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(COSINE_MAX_BETA)
        })
        .collect()
}

/// alpha_bar_t = prod_{s <= t} (1 - beta_s).
pub fn alphas_cumprod(betas: &[f64]) -> Vec<f64> {
    betas
        .iter()
        .scan(1.0, |product, beta| {
            *product *= 1.0 - beta;
            Some(*product)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_hits_both_ends() {
        let v = linspace(0.0, 999.0, 7);
        assert_eq!(v.len(), 7);
        assert_eq!(v[0], 0.0);
        assert_eq!(v[6], 999.0);
        assert_eq!(linspace(3.0, 5.0, 1), vec![3.0]);
    }

    #[test]
    fn cosine_schedule_is_not_constant() {
        // Regression: an integer division i / T (as in candle-transformers) makes every t1 = 0
        // and every t2 = 0 but the last, so the schedule collapses to a constant.
        let b = cosine_betas(1000);
        assert!(b[0] < 1e-4, "first cosine beta {}", b[0]);
        assert!(b[500] > b[0] && b[900] > b[500]);
        assert_eq!(b[999], COSINE_MAX_BETA);
    }

    #[test]
    fn scaled_linear_endpoints_are_beta_start_and_end() {
        let b = betas(BetaSchedule::ScaledLinear, 0.00085, 0.012, 1000);
        assert!((b[0] - 0.00085).abs() < 1e-15);
        assert!((b[999] - 0.012).abs() < 1e-15);
    }
}
