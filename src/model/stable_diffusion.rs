//! A whole Stable Diffusion model as two parts: the [`TextEncoder`] (tokenizer + CLIP) and the
//! [`StableDiffusion`] denoiser (UNet + VAE), so that a run can encode its prompts and free the
//! text encoder before the UNet's weights arrive. Loading them is `weights::loader`'s job.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::clip::ClipTextTransformer;
use super::tokenizer::ClipTokenizer;
use super::unet::UNet2DConditionModel;
use super::vae::Vae;

/// Prompts to embeddings: the tokenizer and the text encoder.
pub struct TextEncoder {
    pub tokenizer: ClipTokenizer,
    pub model: ClipTextTransformer,
    pub device: Device,
}

impl TextEncoder {
    pub fn new(tokenizer: ClipTokenizer, model: ClipTextTransformer, device: &Device) -> Self {
        Self {
            tokenizer,
            model,
            device: device.clone(),
        }
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

/// Latents to images: the UNet and the VAE decoder.
pub struct StableDiffusion {
    pub unet: UNet2DConditionModel,
    pub vae: Vae,
    /// The dtype of the text encoder and UNet.
    pub dtype: DType,
    /// The VAE's: f32 when its config says `force_upcast` and the model runs in f16 (SD's VAE
    /// overflows in f16), as diffusers does.
    pub vae_dtype: DType,
    pub device: Device,
}

impl StableDiffusion {
    pub fn new(unet: UNet2DConditionModel, vae: Vae, dtype: DType, vae_dtype: DType, device: &Device) -> Self {
        Self {
            unet,
            vae,
            dtype,
            vae_dtype,
            device: device.clone(),
        }
    }
}
