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
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use super::files::ModelFiles;
use super::ldm_keys::{SDXL_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX};
use super::ldm_write;
use super::loader::{component_weight_file, ModelConfigs};
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
    let mut components = vec![
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
    if let Some(second) = &single.text_encoder_2 {
        components.push(("text_encoder_2", "model.safetensors", second, &configs.text_encoder_2));
    }
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
    let sdxl = single.family == Family::Sdxl;
    copy_tokenizer(&single.tokenizer_folder()?, &out.join("tokenizer"))?;
    if sdxl {
        copy_tokenizer(&single.tokenizer_2_folder()?, &out.join("tokenizer_2"))?;
    }
    let scheduler_class = configs
        .scheduler
        .get("_class_name")
        .and_then(Value::as_str)
        .unwrap_or("DDIMScheduler");
    let index = if sdxl {
        json!({
            "_class_name": "StableDiffusionXLPipeline",
            "force_zeros_for_empty_prompt": true,
            "scheduler": ["diffusers", scheduler_class],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        })
    } else {
        json!({
            "_class_name": "StableDiffusionPipeline",
            "feature_extractor": [null, null],
            "requires_safety_checker": false,
            "safety_checker": [null, null],
            "scheduler": ["diffusers", scheduler_class],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        })
    };
    write_json(&out.join("model_index.json"), &index)?;
    Ok(written)
}

/// The tokenizer files of `from` copied into `to`.
fn copy_tokenizer(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    for name in TOKENIZER_FILES {
        let source = from.join(name);
        if source.is_file() {
            std::fs::copy(&source, to.join(name)).with_context(|| format!("cannot copy {}", source.display()))?;
        }
    }
    Ok(())
}

/// What `write_sdxl` marks in the file.
#[derive(Debug, Clone, Copy, Default)]
pub struct Marks {
    /// Empty `v_pred` tensor: v-prediction (ComfyUI, A1111, sd.cpp read it).
    pub v_pred: bool,
    /// Empty `ztsnr` tensor: zero terminal SNR.
    pub ztsnr: bool,
}

/// Writes the diffusers SDXL model `files` (whose configs are `configs`) as one SAI-layout
/// `.safetensors` at `out`, tensors in `dtype`, with `marks`. Returns the number of tensors.
pub fn write_sdxl(files: &ModelFiles, configs: &ModelConfigs, out: &Path, dtype: DType, marks: Marks) -> Result<usize> {
    let location = files.location().to_string();
    if configs.text_encoder_2.is_none() || configs.unet.text_time.is_none() {
        bail!("{location} is not an SDXL model (no text_encoder_2 or no text_time UNet); only SDXL is written as a single file");
    }
    let device = Device::Cpu;
    let read = |component: &str| -> Result<HashMap<String, Tensor>> {
        let path = component_weight_file(files, component, DType::F32)?;
        if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            bail!(
                "{}: only .safetensors weights are written to a single file",
                path.display()
            );
        }
        candle_core::safetensors::load(&path, &device).with_context(|| format!("cannot read {}", path.display()))
    };
    let mut written: Vec<(String, Tensor)> = Vec::new();

    let unet = read("unet")?;
    let blocks = ldm_write::UNetBlocks::from_names(unet.keys().map(String::as_str));
    for (name, tensor) in unet {
        let ldm = blocks
            .ldm_name(&name)
            .with_context(|| format!("{location}: UNet tensor {name} has no LDM name"))?;
        written.push((format!("{UNET_PREFIX}{ldm}"), tensor));
    }

    let vae = read("vae")?;
    let levels = ldm_write::indices(vae.keys().map(String::as_str), "decoder.up_blocks.").len();
    for (name, tensor) in vae {
        let ldm = ldm_write::vae_ldm_name(&name, levels)
            .with_context(|| format!("{location}: VAE tensor {name} has no LDM name"))?;
        // LDM keeps the mid-block attention's projections as 1x1 convolutions.
        let tensor = if ldm.contains(".mid.attn_1.") && name.ends_with(".weight") && tensor.rank() == 2 {
            tensor.unsqueeze(2)?.unsqueeze(3)?
        } else {
            tensor
        };
        written.push((format!("{VAE_PREFIX}{ldm}"), tensor));
    }

    for (name, tensor) in read("text_encoder")? {
        if name.ends_with("position_ids") || name.starts_with("text_projection") {
            continue;
        }
        written.push((
            format!("{SDXL_CLIP_PREFIX}text_model.{}", ldm_write::bare(&name)),
            tensor,
        ));
    }
    written.extend(ldm_write::open_clip_tensors(&read("text_encoder_2")?, &location)?);

    let empty = || Tensor::zeros(0, DType::F32, &device);
    if marks.v_pred {
        written.push(("v_pred".into(), empty()?));
    }
    if marks.ztsnr {
        written.push(("ztsnr".into(), empty()?));
    }
    let count = written.len();
    let tensors = written
        .into_iter()
        .map(|(name, tensor)| {
            let tensor = if tensor.elem_count() == 0 {
                tensor
            } else {
                tensor.to_dtype(dtype)?
            };
            Ok((name, tensor))
        })
        .collect::<Result<HashMap<_, _>>>()?;
    if tensors.len() != count {
        bail!("{location}: two tensors map to one LDM name; the folder is not a diffusers SDXL layout");
    }
    candle_core::safetensors::save(&tensors, out).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(count)
}
