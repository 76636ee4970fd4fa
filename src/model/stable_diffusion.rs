//! A whole Stable Diffusion model as two parts: the [`TextEncoder`] (tokenizer + CLIP) and the
//! [`StableDiffusion`] denoiser (UNet + VAE), so that a run can encode its prompts and free the
//! text encoder before the UNet's weights arrive. Loading them is `weights::loader`'s job.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::clip::{ClipLayer, ClipOutput, ClipTextTransformer};
use super::tokenizer::ClipTokenizer;
use super::unet::UNet2DConditionModel;
use super::vae::Vae;

/// A tokenizer and the CLIP text model it feeds.
pub struct ClipEncoder {
    pub tokenizer: ClipTokenizer,
    pub model: ClipTextTransformer,
}

/// Tokenizes `prompts` (padded to the tokenizer's length) and runs the encoder on them.
fn run_clip(
    tokenizer: &ClipTokenizer,
    model: &ClipTextTransformer,
    prompts: &[&str],
    layer: ClipLayer,
    pooled: bool,
    device: &Device,
) -> Result<ClipOutput> {
    let mut ids = Vec::with_capacity(prompts.len() * tokenizer.max_length());
    for prompt in prompts {
        ids.extend(tokenizer.encode(prompt)?);
    }
    let ids = Tensor::from_vec(ids, (prompts.len(), tokenizer.max_length()), device)?;
    Ok(model.encode(&ids, layer, pooled)?)
}

/// What the prompts give the UNet: the per-token embeddings and, for SDXL, the pooled one.
#[derive(Debug, Clone)]
pub struct PromptEncoding {
    /// (b, tokens, dim), in the model's dtype.
    pub context: Tensor,
    /// (b, pooled_dim): SDXL's `pooled_prompt_embeds`.
    pub pooled: Option<Tensor>,
}

impl PromptEncoding {
    /// diffusers' SDXL `force_zeros_for_empty_prompt`: zeros of the same shapes.
    pub fn zeros_like(&self) -> Result<Self> {
        Ok(Self {
            context: self.context.zeros_like()?,
            pooled: self.pooled.as_ref().map(Tensor::zeros_like).transpose()?,
        })
    }
}

/// Prompts to embeddings: the tokenizer and the text encoder, and SDXL's second pair
/// (`tokenizer_2`, `text_encoder_2`).
pub struct TextEncoder {
    pub tokenizer: ClipTokenizer,
    pub model: ClipTextTransformer,
    /// SDXL: OpenCLIP bigG with its projection; the pooled embedding comes from it.
    pub second: Option<ClipEncoder>,
    pub device: Device,
}

impl TextEncoder {
    pub fn new(tokenizer: ClipTokenizer, model: ClipTextTransformer, device: &Device) -> Self {
        Self {
            tokenizer,
            model,
            second: None,
            device: device.clone(),
        }
    }

    /// With SDXL's second tokenizer and encoder.
    pub fn with_second(mut self, second: ClipEncoder) -> Self {
        self.second = Some(second);
        self
    }

    /// Text embeddings of a batch of prompts, (b, tokens, dim), in the model's dtype.
    pub fn encode(&self, prompts: &[&str]) -> Result<Tensor> {
        Ok(self.encode_prompts(prompts)?.context)
    }

    /// The prompts' conditioning ([`encode_prompts_with`]).
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<PromptEncoding> {
        encode_prompts_with(
            &self.tokenizer,
            &self.model,
            self.second.as_ref(),
            prompts,
            &self.device,
        )
    }
}

/// The conditioning of `prompts` from a first encoder and SDXL's second. SD 1.x/2.x: the last
/// hidden state after the final norm. SDXL (diffusers' `StableDiffusionXLPipeline.encode_prompt`):
/// each encoder's `hidden_states[-2]` concatenated on the channel axis, and the second encoder's
/// projected pooled output.
pub fn encode_prompts_with(
    tokenizer: &ClipTokenizer,
    model: &ClipTextTransformer,
    second: Option<&ClipEncoder>,
    prompts: &[&str],
    device: &Device,
) -> Result<PromptEncoding> {
    let first = |layer| run_clip(tokenizer, model, prompts, layer, false, device);
    match second {
        None => Ok(PromptEncoding {
            context: first(ClipLayer::Last)?.hidden,
            pooled: None,
        }),
        Some(second) => {
            let a = first(ClipLayer::FromEnd(2))?;
            let b = run_clip(
                &second.tokenizer,
                &second.model,
                prompts,
                ClipLayer::FromEnd(2),
                true,
                device,
            )?;
            Ok(PromptEncoding {
                context: Tensor::cat(&[&a.hidden, &b.hidden], 2)?,
                pooled: b.pooled,
            })
        }
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
