//! `scheduler/scheduler_config.json`, as diffusers' `DDIMScheduler` reads it.
//!
//! SD repositories ship configs of other scheduler classes (`PNDMScheduler`,
//! `EulerDiscreteScheduler`, ...); diffusers builds a DDIM scheduler from any of them with
//! `DDIMScheduler.from_config`, taking the keys it knows and defaulting the rest. We do the same.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::schedule::{BetaSchedule, BetaSource, TimestepSpacing};

/// The keys of `DDIMScheduler.__init__`, with its defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: String,
    pub trained_betas: Option<Vec<f64>>,
    pub set_alpha_to_one: bool,
    pub steps_offset: usize,
    pub prediction_type: String,
    pub timestep_spacing: String,
    pub rescale_betas_zero_snr: bool,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub thresholding: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            class_name: None,
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: "epsilon".into(),
            timestep_spacing: "leading".into(),
            rescale_betas_zero_snr: false,
            clip_sample: true,
            clip_sample_range: 1.0,
            thresholding: false,
        }
    }
}

impl SchedulerConfig {
    /// Reads `path`; every error names the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let config: Self = super::read_json(path)?;
        config
            .beta_source()
            .and_then(|source| source.betas())
            .with_context(|| format!("{}: bad beta schedule", path.display()))?;
        config
            .spacing()
            .with_context(|| format!("{}: bad timestep_spacing", path.display()))?;
        Ok(config)
    }

    /// Where the betas come from: `trained_betas` when given, else the named schedule.
    pub fn beta_source(&self) -> Result<BetaSource> {
        if let Some(betas) = &self.trained_betas {
            return Ok(BetaSource::Explicit(betas.clone()));
        }
        let schedule: BetaSchedule = self.beta_schedule.parse().map_err(anyhow::Error::msg)?;
        Ok(BetaSource::Named {
            schedule,
            beta_start: self.beta_start,
            beta_end: self.beta_end,
            train_timesteps: self.num_train_timesteps,
        })
    }

    pub fn spacing(&self) -> Result<TimestepSpacing> {
        self.timestep_spacing.parse().map_err(anyhow::Error::msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd2_pndm_config_parses_with_unknown_keys() {
        let json = r#"{"_class_name": "PNDMScheduler", "_diffusers_version": "0.8.0",
            "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "clip_sample": false, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
            "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null}"#;
        let config: SchedulerConfig = serde_json::from_str(json).unwrap();
        assert_eq!(config.beta_source().unwrap(), BetaSource::STABLE_DIFFUSION);
        assert_eq!(config.spacing().unwrap(), TimestepSpacing::Leading);
        assert!(!config.rescale_betas_zero_snr);
        assert_eq!(config.prediction_type, "v_prediction");
    }
}
