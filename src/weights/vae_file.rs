//! `--vae DIR|FILE`: a VAE other than the model's own, as A1111's "SD VAE" and ComfyUI's VAE
//! loader allow (SDXL's fp16-fix VAE, which decodes in f16 without overflowing, is the common
//! one). A folder is a diffusers VAE (`config.json` and its weights, or a model folder's `vae/`);
//! a file holds one VAE's tensors under diffusers' names or the original LDM names
//! (`decoder.up.0.block.0...`, with or without `first_stage_model.`), read with the model's VAE
//! config, since a lone file carries none.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use candle_nn::var_builder::SimpleBackend;

use super::ldm_keys::{self, VAE_PREFIX};
use super::single_file::{Checkpoint, Renamed};
use super::weight_file::open_backend;
use crate::config::read_json;
use crate::config::vae::VaeConfig;

/// Where the separate VAE's tensors come from.
#[derive(Debug)]
enum VaeTensors {
    /// diffusers names: the file is read as it is.
    Diffusers(PathBuf),
    /// LDM names, renamed on the fly.
    Ldm(Arc<ldm_keys::RenameMap>),
}

/// A VAE given with `--vae`.
#[derive(Debug)]
pub struct SeparateVae {
    path: PathBuf,
    /// Its own config (a folder) or the model's (a file).
    pub config: VaeConfig,
    tensors: VaeTensors,
}

/// The weight file of a diffusers VAE folder at `dtype` (the f16 variant first under half
/// precision, as a model folder's components).
fn folder_weights(folder: &Path, dtype: DType) -> Result<PathBuf> {
    let stem = "diffusion_pytorch_model";
    let mut names = vec![format!("{stem}.safetensors"), format!("{stem}.bin")];
    if matches!(dtype, DType::F16 | DType::BF16) {
        names.insert(0, format!("{stem}.fp16.safetensors"));
    } else {
        names.push(format!("{stem}.fp16.safetensors"));
    }
    names
        .iter()
        .map(|name| folder.join(name))
        .find(|path| path.is_file())
        .with_context(|| format!("--vae {}: no {stem}.safetensors or .bin in it", folder.display()))
}

impl SeparateVae {
    /// Opens `path` (a folder or a file); `model_config` is the model's VAE config, which a file
    /// must fit.
    pub fn open(path: &Path, model_config: &VaeConfig, dtype: DType) -> Result<Self> {
        let label = path.display();
        if path.is_dir() {
            let folder = if path.join("config.json").is_file() {
                path.to_path_buf()
            } else if path.join("vae/config.json").is_file() {
                path.join("vae")
            } else {
                bail!("--vae {label}: a VAE folder needs config.json (or a model folder with vae/config.json)");
            };
            let config: VaeConfig = read_json(&folder.join("config.json"))?;
            config
                .validate()
                .with_context(|| format!("--vae {}", folder.join("config.json").display()))?;
            return Ok(Self {
                path: path.to_path_buf(),
                config,
                tensors: VaeTensors::Diffusers(folder_weights(&folder, dtype)?),
            });
        }
        if !path.is_file() {
            bail!("--vae {label}: no such file or folder");
        }
        let (_, names) = open_backend(path).with_context(|| format!("--vae {label}"))?;
        let diffusers = names.iter().any(|n| n.starts_with("decoder.up_blocks."));
        let ldm = names
            .iter()
            .any(|n| n.starts_with("decoder.up.") || n.starts_with("first_stage_model.decoder.up."));
        let tensors = if diffusers {
            VaeTensors::Diffusers(path.to_path_buf())
        } else if ldm {
            VaeTensors::Ldm(Arc::new(ldm_renames(path, &names)?))
        } else {
            bail!(
                "--vae {label} holds no VAE decoder (neither diffusers' decoder.up_blocks.* nor the original decoder.up.*)"
            );
        };
        Ok(Self {
            path: path.to_path_buf(),
            config: model_config.clone(),
            tensors,
        })
    }

    /// The VAE's tensors as a backend, their names and a label for messages.
    pub fn backend(&self) -> Result<(Box<dyn SimpleBackend>, BTreeSet<String>, String)> {
        let label = format!("{} (--vae)", self.path.display());
        Ok(match &self.tensors {
            VaeTensors::Diffusers(file) => {
                let (backend, names) = open_backend(file)?;
                (backend, names, label)
            }
            VaeTensors::Ldm(map) => {
                let file = Arc::new(Checkpoint::open(&self.path)?);
                let names = map.keys().cloned().collect();
                (Box::new(Renamed::new(file, map.clone())), names, label)
            }
        })
    }
}

/// The renames of a lone LDM VAE file, whose keys may lack the `first_stage_model.` prefix.
fn ldm_renames(path: &Path, names: &BTreeSet<String>) -> Result<ldm_keys::RenameMap> {
    let prefixed = names.iter().any(|n| n.starts_with(VAE_PREFIX));
    let keys: BTreeSet<&str> = names
        .iter()
        .filter_map(|n| {
            if prefixed {
                n.strip_prefix(VAE_PREFIX)
            } else {
                Some(n.as_str())
            }
        })
        .collect();
    let file = Checkpoint::open(path)?;
    let (mut map, _unknown) = ldm_keys::vae_renames(&keys, |k| {
        let key = if prefixed {
            format!("{VAE_PREFIX}{k}")
        } else {
            k.to_string()
        };
        file.shape(&key)
    });
    if !prefixed {
        for source in map.values_mut() {
            if let Some(bare) = source.key.strip_prefix(VAE_PREFIX) {
                source.key = bare.to_string();
            }
        }
    }
    Ok(map)
}
