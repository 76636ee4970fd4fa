//! Serde mirrors of the diffusers JSON config files. Field names are the JSON keys; defaults are
//! those of the diffusers/transformers constructors (not Stable Diffusion's values), and unknown
//! keys are tolerated, as diffusers' `ConfigMixin` does. Each mirror validates itself (or resolves
//! into a validated spec) so that a value we cannot honour is an error naming its key.

pub mod clip;
pub mod scheduler;
pub mod taesd;
pub mod unet;
pub mod vae;

use std::path::Path;

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;

/// Reads and parses a JSON config file, naming the file in every error.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a valid config", path.display()))
}
