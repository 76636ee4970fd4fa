//! A whole Stable Diffusion model in the diffusers layout: tokenizer, text encoder, UNet, VAE and
//! scheduler config, loaded from a local folder or a hub repo, in two parts: the [`TextEncoder`]
//! (tokenizer + CLIP) and the [`StableDiffusion`] denoiser (UNet + VAE), so that a run can encode
//! its prompts and free the text encoder before the UNet's weights arrive.
//!
//! Weights: with f16/bf16, `*.fp16.safetensors` is preferred when the model ships it (half the
//! download); then `*.safetensors` (read tensor by tensor, not mapped), then pickled `*.bin`
//! (the paper's ByteDance checkpoints ship only those).

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

use super::clip::ClipTextTransformer;
use super::files::{ModelFiles, ModelLocation};
use super::tokenizer::ClipTokenizer;
use super::unet::UNet2DConditionModel;
use super::vae::Vae;
use super::weights::Weights;
use crate::config::clip::ClipTextConfig;
use crate::config::read_json;
use crate::config::scheduler::SchedulerConfig;
use crate::config::unet::{UNetConfig, UNetSpec};
use crate::config::vae::VaeConfig;

/// Where each part lives in the diffusers layout.
pub const SCHEDULER_CONFIG: &str = "scheduler/scheduler_config.json";

/// Weight file names to try, in order of preference, for a component.
fn weight_candidates(component: &str, stem: &str, dtype: DType) -> Vec<String> {
    let half = matches!(dtype, DType::F16 | DType::BF16);
    let full = [
        format!("{component}/{stem}.safetensors"),
        format!("{component}/{stem}.bin"),
    ];
    let fp16 = [
        format!("{component}/{stem}.fp16.safetensors"),
        format!("{component}/{stem}.fp16.bin"),
    ];
    if half {
        [fp16[0].clone(), full[0].clone(), fp16[1].clone(), full[1].clone()].into()
    } else {
        [full[0].clone(), full[1].clone(), fp16[0].clone(), fp16[1].clone()].into()
    }
}

/// Prompts to embeddings: the tokenizer and the text encoder.
pub struct TextEncoder {
    pub tokenizer: ClipTokenizer,
    pub model: ClipTextTransformer,
    pub device: Device,
}

impl TextEncoder {
    pub fn load(files: &ModelFiles, dtype: DType, device: &Device) -> Result<Self> {
        let tokenizer = load_tokenizer(files)?;
        let config_path = files.get("text_encoder/config.json")?;
        let config: ClipTextConfig = read_json(&config_path)?;
        config
            .validate()
            .with_context(|| format!("{}", config_path.display()))?;
        let weight_file = files.first_present(&weight_candidates("text_encoder", "model", dtype))?;
        let model = Weights::open(&weight_file, dtype, device)?.build(|vb| ClipTextTransformer::new(vb, &config))?;
        Ok(Self {
            tokenizer,
            model,
            device: device.clone(),
        })
    }

    /// Text embeddings of a batch of prompts, (b, tokens, dim), in the model's dtype.
    pub fn encode(&self, prompts: &[&str]) -> Result<Tensor> {
        let mut ids = Vec::with_capacity(prompts.len() * self.tokenizer.max_length());
        for prompt in prompts {
            ids.extend(self.tokenizer.encode(prompt)?);
        }
        let ids = Tensor::from_vec(ids, (prompts.len(), self.tokenizer.max_length()), &self.device)?;
        Ok(self.model.forward(&ids)?)
    }
}

/// Latents to images: the UNet, the VAE and the scheduler config.
pub struct StableDiffusion {
    pub location: ModelLocation,
    pub unet: UNet2DConditionModel,
    pub unet_spec: UNetSpec,
    pub vae: Vae,
    pub scheduler: SchedulerConfig,
    /// The dtype of the text encoder and UNet.
    pub dtype: DType,
    /// The VAE's: f32 when its config says `force_upcast` and the model runs in f16 (SD's VAE
    /// overflows in f16), as diffusers does.
    pub vae_dtype: DType,
    pub device: Device,
}

/// Reads the scheduler config of a model: cheap, so settings can be checked before loading weights.
pub fn read_scheduler_config(files: &ModelFiles) -> Result<SchedulerConfig> {
    let path = files.get(SCHEDULER_CONFIG)?;
    SchedulerConfig::from_file(&path)
}

/// Reads and resolves a model's UNet config.
pub fn read_unet_spec(files: &ModelFiles) -> Result<UNetSpec> {
    let path = files.get("unet/config.json")?;
    read_json::<UNetConfig>(&path)?
        .resolve()
        .with_context(|| format!("{}", path.display()))
}

/// Reads and validates a model's VAE config.
pub fn read_vae_config(files: &ModelFiles) -> Result<VaeConfig> {
    let path = files.get("vae/config.json")?;
    let config: VaeConfig = read_json(&path)?;
    config.validate().with_context(|| format!("{}", path.display()))?;
    Ok(config)
}

impl StableDiffusion {
    /// Loads the UNet and the VAE (the text encoder is [`TextEncoder::load`]).
    pub fn load(files: &ModelFiles, dtype: DType, device: &Device) -> Result<Self> {
        let scheduler = read_scheduler_config(files)?;
        let unet_spec = read_unet_spec(files)?;
        let unet_file = files.first_present(&weight_candidates("unet", "diffusion_pytorch_model", dtype))?;
        let unet =
            Weights::open(&unet_file, dtype, device)?.build(|vb| Ok(UNet2DConditionModel::new(vb, &unet_spec)?))?;

        let vae_config = read_vae_config(files)?;
        let vae_dtype = Vae::decode_dtype(&vae_config, dtype);
        let vae_file = files.first_present(&weight_candidates("vae", "diffusion_pytorch_model", vae_dtype))?;
        let vae = super::build_vae(&vae_file, &vae_config, vae_dtype, device)?;

        Ok(Self {
            location: files.location().clone(),
            unet,
            unet_spec,
            vae,
            scheduler,
            dtype,
            vae_dtype,
            device: device.clone(),
        })
    }
}

/// The tokenizer folder: `tokenizer.json`, or `vocab.json` + `merges.txt`, with the optional
/// special-token files fetched beside them.
fn load_tokenizer(files: &ModelFiles) -> Result<ClipTokenizer> {
    let main = files.first_present(&["tokenizer/tokenizer.json".into(), "tokenizer/vocab.json".into()])?;
    for optional in [
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
    ] {
        if files.has(optional)? {
            files.get(optional)?;
        }
    }
    let folder = main.parent().context("tokenizer file has no folder")?;
    ClipTokenizer::from_folder(folder)
}
