//! What fine-tuning writes: the diffusers-layout model folder (the trained components saved, the
//! others copied, the scheduler config switched to the paper's settings), and checkpoints
//! (`checkpoints/step-NNNNNN/`: a loadable `model/` plus `state/` with the live weights, the
//! AdamW moments and the EMA, enough for `--resume` to continue bit for bit). A checkpoint is
//! written under a `.partial` name and renamed when complete, so an interrupted save never
//! leaves one that `--resume` would pick up.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::params::save_safetensors;
use crate::weights::files::ModelFiles;
use crate::weights::loader::{component_weight_file, SCHEDULER_CONFIG, TOKENIZER_FILES};

/// Where checkpoints go inside `--out`.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
const STATE_FILE: &str = "training_state.json";
const UNET_WEIGHTS: &str = "unet/diffusion_pytorch_model.safetensors";
const TEXT_ENCODER_WEIGHTS: &str = "text_encoder/model.safetensors";

/// The scheduler keys a fine-tuned model needs (Lin et al.: zero terminal SNR, v-prediction,
/// trailing timesteps).
const SCHEDULER_OVERRIDES: [(&str, &str); 3] = [
    ("rescale_betas_zero_snr", "true"),
    ("prediction_type", "\"v_prediction\""),
    ("timestep_spacing", "\"trailing\""),
];

/// The trained weights to write, by their file names.
pub struct TrainedWeights {
    pub unet: HashMap<String, Tensor>,
    /// Present when the text encoder was trained.
    pub text_encoder: Option<HashMap<String, Tensor>>,
}

/// Removes the file at `path` if there is one, so what is written there next is a new file.
/// A model folder written before may hold hard links to the source model's files
/// ([`copy_from`]): writing through one (`fs::write`, `fs::copy`, a safetensors save all
/// truncate the file they open) would overwrite the source model itself.
fn unlink_existing(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("replacing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Copies `relative` from the source model to `dir` (a hard link when possible: the source
/// files never change, and no write ever goes through a link: [`unlink_existing`]).
fn copy_from(files: &ModelFiles, relative: &str, dir: &Path) -> Result<()> {
    let source = fs::canonicalize(files.get(relative)?)?;
    let target = dir.join(relative);
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent)?;
    }
    unlink_existing(&target)?;
    if fs::hard_link(&source, &target).is_err() {
        fs::copy(&source, &target).with_context(|| format!("copying {} to {}", source.display(), target.display()))?;
    }
    Ok(())
}

/// The source model's scheduler config with [`SCHEDULER_OVERRIDES`] set (other keys kept).
fn scheduler_config(files: &ModelFiles) -> Result<String> {
    let path = files.get(SCHEDULER_CONFIG)?;
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut config: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    for (key, value) in SCHEDULER_OVERRIDES {
        config.insert(key.into(), serde_json::from_str(value)?);
    }
    Ok(serde_json::to_string_pretty(&config)? + "\n")
}

/// Writes a diffusers-layout model folder at `dir` (created; files in it are replaced).
pub fn write_model_folder(dir: &Path, files: &ModelFiles, weights: &TrainedWeights) -> Result<()> {
    fs::create_dir_all(dir.join("unet"))?;
    fs::create_dir_all(dir.join("scheduler"))?;
    unlink_existing(&dir.join(SCHEDULER_CONFIG))?;
    fs::write(dir.join(SCHEDULER_CONFIG), scheduler_config(files)?)?;
    if files.has("model_index.json")? {
        copy_from(files, "model_index.json", dir)?;
    }
    copy_from(files, "unet/config.json", dir)?;
    unlink_existing(&dir.join(UNET_WEIGHTS))?;
    save_safetensors(&weights.unet, &dir.join(UNET_WEIGHTS))?;
    copy_from(files, "text_encoder/config.json", dir)?;
    match &weights.text_encoder {
        Some(tensors) => {
            unlink_existing(&dir.join(TEXT_ENCODER_WEIGHTS))?;
            save_safetensors(tensors, &dir.join(TEXT_ENCODER_WEIGHTS))?
        }
        None => {
            let source = component_weight_file(files, "text_encoder", DType::F32)?;
            copy_component_file(files, &source, "text_encoder", dir)?;
        }
    }
    copy_from(files, "vae/config.json", dir)?;
    let vae = component_weight_file(files, "vae", DType::F32)?;
    copy_component_file(files, &vae, "vae", dir)?;
    for tokenizer_file in TOKENIZER_FILES {
        if files.has(tokenizer_file)? {
            copy_from(files, tokenizer_file, dir)?;
        }
    }
    // SDXL: the second text encoder (frozen) and its tokenizer, as they are.
    if files.has("text_encoder_2/config.json")? {
        copy_from(files, "text_encoder_2/config.json", dir)?;
        let source = component_weight_file(files, "text_encoder_2", DType::F32)?;
        copy_component_file(files, &source, "text_encoder_2", dir)?;
        for tokenizer_file in TOKENIZER_FILES {
            let second = tokenizer_file.replacen("tokenizer/", "tokenizer_2/", 1);
            if files.has(&second)? {
                copy_from(files, &second, dir)?;
            }
        }
    }
    Ok(())
}

fn copy_component_file(files: &ModelFiles, source: &Path, component: &str, dir: &Path) -> Result<()> {
    let name = source.file_name().context("weight file has no name")?.to_string_lossy();
    copy_from(files, &format!("{component}/{name}"), dir)
}

/// What a checkpoint records besides tensors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainingState {
    /// Optimizer steps done.
    pub step: usize,
    /// The trainable parameters' names (`unet/...`, `text_encoder/...`), in optimizer order.
    pub names: Vec<String>,
    /// AdamW's per-parameter step counts.
    pub optimizer_steps: Vec<u64>,
    /// The settings that must not change across a resume, as text.
    pub settings: String,
}

/// The tensors of a checkpoint's `state/`.
pub struct StateTensors {
    pub weights: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
    pub ema: Option<HashMap<String, Tensor>>,
}

pub fn checkpoint_dir(out: &Path, step: usize) -> PathBuf {
    out.join(CHECKPOINTS_DIR).join(format!("step-{step:06}"))
}

/// Writes checkpoint `state.step` under `out`: `model/` (loadable by `generate`) and `state/`.
pub fn save_checkpoint(
    out: &Path,
    files: &ModelFiles,
    model: &TrainedWeights,
    state: &TrainingState,
    tensors: &StateTensors,
) -> Result<PathBuf> {
    let done = checkpoint_dir(out, state.step);
    let partial = done.with_extension("partial");
    if partial.exists() {
        fs::remove_dir_all(&partial)?;
    }
    write_model_folder(&partial.join("model"), files, model)?;
    let state_dir = partial.join("state");
    fs::create_dir_all(&state_dir)?;
    save_safetensors(&tensors.weights, &state_dir.join("weights.safetensors"))?;
    save_safetensors(&tensors.optimizer, &state_dir.join("optimizer.safetensors"))?;
    if let Some(ema) = &tensors.ema {
        save_safetensors(ema, &state_dir.join("ema.safetensors"))?;
    }
    fs::write(state_dir.join(STATE_FILE), serde_json::to_string_pretty(state)? + "\n")?;
    if done.exists() {
        fs::remove_dir_all(&done)?;
    }
    fs::rename(&partial, &done).with_context(|| format!("renaming {} to {}", partial.display(), done.display()))?;
    Ok(done)
}

/// The latest complete checkpoint under `out`, if any.
pub fn latest_checkpoint(out: &Path) -> Result<Option<PathBuf>> {
    let dir = out.join(CHECKPOINTS_DIR);
    if !dir.is_dir() {
        return Ok(None);
    }
    let mut latest: Option<(usize, PathBuf)> = None;
    for entry in fs::read_dir(&dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse::<usize>().ok()) else {
            continue;
        };
        if path.join("state").join(STATE_FILE).is_file() && latest.as_ref().is_none_or(|(s, _)| step > *s) {
            latest = Some((step, path));
        }
    }
    Ok(latest.map(|(_, path)| path))
}

/// Reads a checkpoint's state.
pub fn load_checkpoint(dir: &Path, device: &Device) -> Result<(TrainingState, StateTensors)> {
    let state_dir = dir.join("state");
    let text = fs::read_to_string(state_dir.join(STATE_FILE)).with_context(|| format!("reading {}", dir.display()))?;
    let state: TrainingState =
        serde_json::from_str(&text).with_context(|| format!("parsing {}/state/{STATE_FILE}", dir.display()))?;
    let load = |name: &str| -> Result<HashMap<String, Tensor>> {
        let path = state_dir.join(name);
        candle_core::safetensors::load(&path, device).with_context(|| format!("reading {}", path.display()))
    };
    let ema_path = state_dir.join("ema.safetensors");
    let tensors = StateTensors {
        weights: load("weights.safetensors")?,
        optimizer: load("optimizer.safetensors")?,
        ema: if ema_path.is_file() {
            Some(load("ema.safetensors")?)
        } else {
            None
        },
    };
    Ok((state, tensors))
}
