//! A whole Stable Diffusion model as two parts: the [`TextEncoder`] (tokenizer + CLIP) and the
//! [`StableDiffusion`] denoiser (UNet + VAE), so that a run can encode its prompts and free the
//! text encoder before the UNet's weights arrive. Loading them is `weights::loader`'s job.

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::sync::{Arc, Mutex};

use super::clip::{ClipLayer, ClipOutput, ClipTextTransformer};
use super::tokenizer::ClipTokenizer;
use super::unet::UNet2DConditionModel;
use super::vae::Vae;
use crate::config::clip::ClipActivation;
use crate::prompt::{empty_chunk, encode_chunks, tokenize_prompt, Emphasis, PromptChunk, TokenizedPrompt};

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

/// How a prompt is read and encoded, beside its text: `--emphasis` and `--clip-skip`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PromptOptions {
    pub emphasis: Emphasis,
    /// A1111's "Clip skip" (`CLIP_stop_at_last_layers`): 1 is the last layer. See
    /// [`TextEncoder::encode_prompt`] for what it does on each family.
    pub clip_skip: usize,
}

impl Default for PromptOptions {
    fn default() -> Self {
        Self {
            emphasis: Emphasis::Original,
            clip_skip: 1,
        }
    }
}

/// One encoder's conditioning of a prompt, chunk by chunk: (1, 77 * chunks, d), and the pooled
/// output of the first chunk when asked for.
fn encode_prompt_with(
    encoder: &ClipTextTransformer,
    tokenized: &TokenizedPrompt,
    empty: &PromptChunk,
    options: PromptOptions,
    layer: ClipLayer,
    pooled: bool,
    device: &Device,
) -> Result<(Tensor, Option<Tensor>)> {
    let run = |ids: &[u32], pooled: bool| -> Result<ClipOutput> {
        let ids = Tensor::from_slice(ids, (1, ids.len()), device)?;
        Ok(encoder.encode(&ids, layer, pooled)?)
    };
    let empty_encoding = match options.emphasis {
        Emphasis::Comfy => Some(run(&empty.ids, false)?.hidden),
        _ => None,
    };
    let mut first_pooled = None;
    let context = encode_chunks(&tokenized.chunks, options.emphasis, empty_encoding.as_ref(), |ids| {
        // A1111's SDXL takes the pooled output of the first chunk (`zs[0].pooled`).
        let out = run(ids, pooled && first_pooled.is_none())?;
        if out.pooled.is_some() {
            first_pooled = out.pooled;
        }
        Ok(out.hidden)
    })?;
    Ok((context, first_pooled))
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

    /// One prompt in A1111's prompt language (emphasis, `BREAK`, any length in chunks of 75
    /// tokens): each chunk encoded on its own and the chunks joined on the token axis, (1,
    /// 77 * chunks, dim), as A1111's `FrozenCLIPEmbedderWithCustomWordsBase.forward` does.
    ///
    /// `clip_skip` N (A1111's numbering, 1 = the last layer):
    /// - SD 1.x (OpenAI CLIP, `quick_gelu`): N > 1 takes `hidden_states[-N]`, then the final
    ///   layer norm (A1111's `FrozenCLIPEmbedderWithCustomWords.encode_with_transformers`;
    ///   diffusers' `clip_skip = N - 1`).
    /// - SD 2.x (OpenCLIP, `gelu`): ignored, as A1111 ignores it there (its
    ///   `FrozenOpenCLIPEmbedderWithCustomWords` never reads the option); the diffusers conversion
    ///   already dropped the last layer, so this is A1111's penultimate layer.
    /// - SDXL: diffusers' rule, `hidden_states[-(N + 1)]` of both encoders without the norm
    ///   (`StableDiffusionXLPipeline.encode_prompt`: `hidden_states[-(clip_skip + 2)]` with its
    ///   `clip_skip = N - 1`), so N = 1 is the penultimate layer SDXL always uses. A1111 differs:
    ///   it changes only CLIP-L, and only with its `sdxl_clip_l_skip` option.
    ///
    /// SDXL: each encoder tokenizes, chunks and weighs the prompt with its own tokenizer (A1111's
    /// two embedders of sgm's `GeneralConditioner`), the chunks are joined on the channel axis,
    /// and the pooled embedding is the second encoder's on the first chunk (A1111's
    /// `zs[0].pooled`).
    pub fn encode_prompt(&self, prompt: &str, options: PromptOptions) -> Result<PromptEncoding> {
        let clip_skip = options.clip_skip.max(1);
        let tokenized = tokenize_prompt(prompt, options.emphasis, &self.tokenizer)?;
        let empty = empty_chunk(&self.tokenizer);
        match &self.second {
            None => {
                let layer = match (self.model.activation(), clip_skip) {
                    (ClipActivation::QuickGelu, n) if n > 1 => ClipLayer::FromEndNormed(n),
                    _ => ClipLayer::Last,
                };
                let (context, _) =
                    encode_prompt_with(&self.model, &tokenized, &empty, options, layer, false, &self.device)?;
                Ok(PromptEncoding { context, pooled: None })
            }
            Some(second) => {
                let layer = ClipLayer::FromEnd(clip_skip + 1);
                let (a, _) = encode_prompt_with(&self.model, &tokenized, &empty, options, layer, false, &self.device)
                    .context("the first text encoder")?;
                let tokenized_2 = tokenize_prompt(prompt, options.emphasis, &second.tokenizer)?;
                ensure!(
                    tokenized_2.chunks.len() == tokenized.chunks.len(),
                    "the two tokenizers cut {prompt:?} into {} and {} chunks",
                    tokenized.chunks.len(),
                    tokenized_2.chunks.len()
                );
                let empty_2 = empty_chunk(&second.tokenizer);
                let (b, pooled) = encode_prompt_with(
                    &second.model,
                    &tokenized_2,
                    &empty_2,
                    options,
                    layer,
                    true,
                    &self.device,
                )
                .context("the second text encoder")?;
                Ok(PromptEncoding {
                    // (1, 77 * chunks, d1 + d2): per chunk, the two encoders side by side.
                    context: Tensor::cat(&[&a, &b], 2)?,
                    pooled,
                })
            }
        }
    }

    /// Text embeddings of a batch of prompts, (b, tokens, dim), in the model's dtype: plain
    /// text cut at 77 tokens, as diffusers' pipelines and training scripts take it (fine-tuning,
    /// `bench`); generation reads prompts with [`Self::encode_prompt`].
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
    /// Behind a lock so that a run holding the model shared can free the UNet once its last
    /// denoising step is done ([`StableDiffusion::release_unet`]); each UNet call holds its own
    /// `Arc` for the call's length.
    unet: Mutex<Option<Arc<UNet2DConditionModel>>>,
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
            unet: Mutex::new(Some(Arc::new(unet))),
            vae,
            dtype,
            vae_dtype,
            device: device.clone(),
        }
    }

    /// The UNet, or an error once [`StableDiffusion::release_unet`] freed it.
    pub fn unet(&self) -> Result<Arc<UNet2DConditionModel>> {
        self.unet_slot()
            .clone()
            .context("internal: the UNet was released before its last use")
    }

    /// Whether the UNet is still loaded.
    pub fn has_unet(&self) -> bool {
        self.unet_slot().is_some()
    }

    /// Frees the UNet's weights (once no call holds it): a run that will not denoise again then
    /// decodes without them resident, so the VAE's activations do not add to the UNet's weights
    /// (SDXL's 10.3 GB in f32). The next [`StableDiffusion::unet`] fails; the engine reloads.
    pub fn release_unet(&self) {
        self.unet_slot().take();
    }

    /// The VAE and the settings, the UNet dropped (to load another UNet beside the same VAE).
    pub fn into_vae(self) -> (Vae, DType, DType, Device) {
        (self.vae, self.dtype, self.vae_dtype, self.device)
    }

    fn unet_slot(&self) -> std::sync::MutexGuard<'_, Option<Arc<UNet2DConditionModel>>> {
        // A panic elsewhere while the lock was held leaves the slot as it was: still valid.
        self.unet.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
