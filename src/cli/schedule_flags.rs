//! The sampling-schedule flags that every sampling subcommand shares.

use clap::Args;

use crate::schedule::TimestepSpacing;

/// The timestep spacing sdfix uses unless told otherwise: the paper's fix (Table 2).
pub const DEFAULT_SPACING: TimestepSpacing = TimestepSpacing::Trailing;

#[derive(Debug, Clone, Args)]
pub struct ScheduleFlags {
    /// Number of sampling steps (1 to the model's training timesteps).
    #[arg(long, default_value_t = 50, value_parser = at_least_one)]
    pub steps: usize,

    /// Timestep spacing: leading, linspace or trailing [default: trailing, the paper's fix].
    #[arg(long, value_name = "SPACING")]
    pub spacing: Option<TimestepSpacing>,

    /// Rescale the betas to zero terminal SNR (the paper's Algorithm 1) [default: the model's
    /// scheduler config, or on without --model].
    #[arg(long, overrides_with = "no_zero_snr")]
    pub zero_snr: bool,

    /// Use the betas as they are, without the zero terminal SNR rescale.
    #[arg(long, overrides_with = "zero_snr")]
    pub no_zero_snr: bool,

    /// Offset added to every `leading` timestep [default: the model's steps_offset, or 1 (SD 2.x)
    /// without --model].
    #[arg(long, value_name = "N")]
    pub steps_offset: Option<usize>,
}

/// Parses a count that must be positive, with a message that says so.
pub fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a whole number")),
    }
}

impl ScheduleFlags {
    /// `Some(true/false)` when `--zero-snr`/`--no-zero-snr` was given (the last one wins).
    pub fn zero_snr(&self) -> Option<bool> {
        match (self.zero_snr, self.no_zero_snr) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        }
    }

    pub fn spacing_or_default(&self) -> TimestepSpacing {
        self.spacing.unwrap_or(DEFAULT_SPACING)
    }
}
