//! A single-file checkpoint written back as a diffusers folder (`sdfix convert`): model_index.json,
//! each component's config and safetensors weights under diffusers names, the scheduler config
//! with the detected prediction type and zero-SNR flag, and the CLIP tokenizer. The folder loads
//! in diffusers' `from_pretrained` and in sdfix like any other.
//!
//! Every tensor the renames give is written, the VAE's encoder included (sdfix reads only the
//! decoder, diffusers both). Components are converted one at a time, so the peak is one
//! component's weights (the UNet's: 3.4 GB in f32 for SD 2.x), not the file's.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde_json::{json, Value};

use super::single_file::{read_component, Family, SingleFile};

/// The tokenizer files a diffusers folder carries.
const TOKENIZER_FILES: &[&str] = &[
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "tokenizer_config.json",
];

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)? + "\n";
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Refuses an `out` that exists and is not empty (before any work).
pub fn check_out(out: &Path) -> Result<()> {
    if out.exists() && std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!("--out {} exists and is not empty; choose a new folder", out.display());
    }
    Ok(())
}

/// Writes `single` as a diffusers folder at `out` (which must not exist, or be empty), weights in
/// `dtype`. Returns the number of tensors written.
pub fn convert(single: &SingleFile, out: &Path, dtype: DType) -> Result<usize> {
    check_out(out)?;
    let device = Device::Cpu;
    let configs = &single.configs;
    let mut written = 0;
    let components = [
        (
            "unet",
            "diffusion_pytorch_model.safetensors",
            &single.unet,
            &configs.unet,
        ),
        ("vae", "diffusion_pytorch_model.safetensors", &single.vae, &configs.vae),
        (
            "text_encoder",
            "model.safetensors",
            &single.text_encoder,
            &configs.text_encoder,
        ),
    ];
    for (folder, file, map, config) in components {
        let dir = out.join(folder);
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        write_json(&dir.join("config.json"), config)?;
        let tensors = read_component(single, map, &device)?
            .into_iter()
            .map(|(name, tensor)| Ok((name, tensor.to_dtype(dtype)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        written += tensors.len();
        let path = dir.join(file);
        candle_core::safetensors::save(&tensors, &path).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let scheduler = out.join("scheduler");
    std::fs::create_dir_all(&scheduler)?;
    write_json(&scheduler.join("scheduler_config.json"), &configs.scheduler)?;
    let tokenizer_source = match &single.tokenizer_dir {
        Some(dir) => dir.clone(),
        None => super::demo::clip_tokenizer_folder(single.family == Family::Sd1)?,
    };
    let tokenizer = out.join("tokenizer");
    std::fs::create_dir_all(&tokenizer)?;
    for name in TOKENIZER_FILES {
        let from = tokenizer_source.join(name);
        if from.is_file() {
            std::fs::copy(&from, tokenizer.join(name)).with_context(|| format!("cannot copy {}", from.display()))?;
        }
    }
    let scheduler_class = configs
        .scheduler
        .get("_class_name")
        .and_then(Value::as_str)
        .unwrap_or("DDIMScheduler");
    write_json(
        &out.join("model_index.json"),
        &json!({
            "_class_name": "StableDiffusionPipeline",
            "feature_extractor": [null, null],
            "requires_safety_checker": false,
            "safety_checker": [null, null],
            "scheduler": ["diffusers", scheduler_class],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }),
    )?;
    Ok(written)
}
