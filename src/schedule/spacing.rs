//! Which training timesteps the sampler visits (Lin et al. 2024, Section 3.3 and Table 2).
//!
//! The lists equal those of diffusers' `DDIMScheduler.set_timesteps` for each
//! `timestep_spacing`, with one deliberate difference: for `trailing`, diffusers computes
//! `np.round(np.arange(T, 0, -T / n)) - 1`, and the float `arange` yields n + 1 values ending in
//! -1 when T / n is not exact and rounds the wrong way (n = 61, 103, 121, ... for T = 1000). We
//! always yield exactly n timesteps, `round_half_even(T - k * T / n) - 1` for k in 0..n, which is
//! diffusers' list without the spurious trailing -1.

use std::fmt;
use std::str::FromStr;

use super::betas::linspace;

/// How `steps` sampling timesteps are spread over `[0, T - 1]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// `k * (T / n)` (integer stride) plus `steps_offset`, from the top: Stable Diffusion's
    /// original choice; it never visits t = T - 1 (starts at 981 for 50 steps), which is flaw 3 of
    /// the paper.
    Leading,
    /// `round(linspace(0, T - 1, n))`, reversed: starts at T - 1, but the steps do not align
    /// with the training grid's ends in the same way as trailing.
    Linspace,
    /// `round(T - k * T / n) - 1`: always starts at T - 1 (the paper's fix, Table 2).
    Trailing,
}

impl TimestepSpacing {
    /// The name diffusers uses in `scheduler_config.json`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Leading => "leading",
            Self::Linspace => "linspace",
            Self::Trailing => "trailing",
        }
    }
}

impl fmt::Display for TimestepSpacing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TimestepSpacing {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "leading" => Ok(Self::Leading),
            "linspace" => Ok(Self::Linspace),
            "trailing" => Ok(Self::Trailing),
            other => Err(format!(
                "unknown timestep spacing {other:?}; expected leading, linspace or trailing"
            )),
        }
    }
}

/// The `steps` timesteps to sample, in the order the sampler visits them (descending).
///
/// `steps_offset` applies to `leading` only, as in diffusers. The caller checks that
/// `1 <= steps <= train_timesteps` and that the offset keeps every timestep below
/// `train_timesteps` ([`super::Schedule::new`] does both).
pub fn timesteps(spacing: TimestepSpacing, steps: usize, train_timesteps: usize, steps_offset: usize) -> Vec<usize> {
    match spacing {
        TimestepSpacing::Leading => {
            let stride = train_timesteps / steps;
            (0..steps).rev().map(|k| k * stride + steps_offset).collect()
        }
        TimestepSpacing::Linspace => linspace(0.0, (train_timesteps - 1) as f64, steps)
            .into_iter()
            .rev()
            .map(|t| t.round_ties_even() as usize)
            .collect(),
        TimestepSpacing::Trailing => {
            let total = train_timesteps as f64;
            let stride = total / steps as f64;
            // np.arange(T, 0, -stride) computes T + k * (-stride); mirror that for equal rounding.
            (0..steps)
                .map(|k| (total + k as f64 * -stride).round_ties_even() as usize - 1)
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_50_starts_at_999() {
        let t = timesteps(TimestepSpacing::Trailing, 50, 1000, 0);
        assert_eq!(t.len(), 50);
        assert_eq!(t[0], 999);
        assert_eq!(t[49], 19);
    }

    #[test]
    fn leading_50_with_offset_starts_at_981() {
        let t = timesteps(TimestepSpacing::Leading, 50, 1000, 1);
        assert_eq!(t[0], 981);
        assert_eq!(t[49], 1);
    }

    #[test]
    fn trailing_with_61_steps_has_61_timesteps() {
        // Regression: diffusers' float arange yields 62 values, the last -1.
        let t = timesteps(TimestepSpacing::Trailing, 61, 1000, 0);
        assert_eq!(t.len(), 61);
        assert_eq!(t[0], 999);
        assert!(t.windows(2).all(|w| w[0] > w[1]));
    }
}
