//! `--taesd DIR`: a TAESD folder in diffusers' `AutoencoderTiny` layout (`config.json` and
//! `diffusion_pytorch_model.safetensors`, as in the `madebyollin/taesd` and `madebyollin/taesdxl`
//! repos). Only the decoder is read (live previews); the encoder's tensors are left in the file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

use super::weight_file::Weights;
use crate::config::read_json;
use crate::config::taesd::{TaesdConfig, TaesdDecoderSpec};
use crate::model::taesd::TaesdDecoder;

/// The weight files a TAESD folder may hold, in order of preference.
const WEIGHT_FILES: [&str; 2] = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"];

/// A TAESD folder whose config has been read and checked; [`TaesdFolder::load_decoder`] reads the
/// weights.
#[derive(Debug, Clone)]
pub struct TaesdFolder {
    pub path: PathBuf,
    pub config: TaesdConfig,
    pub spec: TaesdDecoderSpec,
    weights: PathBuf,
}

impl TaesdFolder {
    /// Reads `path/config.json` and finds the weights; errors name `--taesd`.
    pub fn open(path: &Path) -> Result<Self> {
        let label = path.display();
        if !path.is_dir() {
            bail!("--taesd {label}: no such folder (give a diffusers AutoencoderTiny folder, e.g. a download of madebyollin/taesd)");
        }
        let config_path = path.join("config.json");
        if !config_path.is_file() {
            bail!("--taesd {label}: no config.json in it (a diffusers AutoencoderTiny folder has config.json and diffusion_pytorch_model.safetensors)");
        }
        let config: TaesdConfig = read_json(&config_path).with_context(|| format!("--taesd {label}"))?;
        let spec = config
            .decoder()
            .with_context(|| format!("--taesd {}", config_path.display()))?;
        let weights = WEIGHT_FILES
            .iter()
            .map(|name| path.join(name))
            .find(|p| p.is_file())
            .with_context(|| format!("--taesd {label}: no {} in it", WEIGHT_FILES[0]))?;
        Ok(Self {
            path: path.to_path_buf(),
            config,
            spec,
            weights,
        })
    }

    /// Whether the folder's name says it is TAESD for SDXL (`taesdxl`), as A1111 picks the file by
    /// name: the weights themselves do not tell SD's TAESD from SDXL's.
    pub fn named_for_sdxl(&self) -> bool {
        let path = std::fs::canonicalize(&self.path).unwrap_or_else(|_| self.path.clone());
        path.file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.to_ascii_lowercase().contains("taesdxl"))
    }

    /// Reads the decoder's weights onto `device` in `dtype`. Every `decoder.*` tensor must be
    /// read; the encoder's are left.
    pub fn load_decoder(&self, device: &Device, dtype: DType) -> Result<TaesdDecoder> {
        let weights =
            Weights::open(&self.weights, dtype, device).with_context(|| format!("--taesd {}", self.path.display()))?;
        weights
            .build_part(&["encoder."], |vb| {
                Ok(TaesdDecoder::new(&self.spec, vb.pp("decoder.layers"))?)
            })
            .with_context(|| format!("--taesd {}", self.path.display()))
    }
}
