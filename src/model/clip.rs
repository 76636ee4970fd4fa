//! Our CLIP text transformer (transformers' `CLIPTextModel`), built from `text_encoder/config.json`.
//!
//! Output ([`ClipLayer`]): `last_hidden_state` after the final layer norm, which is what SD
//! 1.x/2.x condition on (SD 2.x ships a 23-layer OpenCLIP ViT-H config, so that is its penultimate
//! layer), or an earlier `hidden_states[-k]` without the norm (SDXL conditions on
//! `hidden_states[-2]` of both encoders) or with it (A1111's "Clip skip" on SD 1.x); and the
//! pooled output, projected for
//! `CLIPTextModelWithProjection` (SDXL's `text_embeds`). Unlike
//! candle-transformers' CLIP, it reads every size from the config, uses the configured activation
//! (exact erf GELU for SD 2.x), and masks correctly for any batch size. Weights load with or
//! without the `text_model.` prefix.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{embedding, Embedding, VarBuilder};

use crate::config::clip::{ClipActivation, ClipTextConfig};
use crate::model::activation;
use crate::model::attention::{causal_mask, scaled_dot_product_attention};
use crate::model::linear::{linear, Linear};
use crate::model::norm::{layer_norm, LayerNorm};

/// `quick_gelu`'s constant: x * sigmoid(1.702 x) approximates GELU (OpenAI CLIP).
const QUICK_GELU_SCALE: f64 = 1.702;

/// The weight-name prefix transformers' `CLIPTextModel` uses.
pub const TEXT_MODEL_PREFIX: &str = "text_model";

fn activate(xs: &Tensor, activation: ClipActivation) -> Result<Tensor> {
    match activation {
        ClipActivation::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * QUICK_GELU_SCALE)?)?,
        ClipActivation::Gelu => activation::gelu_erf(xs),
        ClipActivation::GeluTanh => xs.gelu(),
    }
}

#[derive(Debug)]
struct SelfAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
}

impl SelfAttention {
    fn new(vb: VarBuilder, config: &ClipTextConfig) -> Result<Self> {
        let d = config.hidden_size;
        Ok(Self {
            q_proj: linear(d, d, vb.pp("q_proj"))?,
            k_proj: linear(d, d, vb.pp("k_proj"))?,
            v_proj: linear(d, d, vb.pp("v_proj"))?,
            out_proj: linear(d, d, vb.pp("out_proj"))?,
            heads: config.num_attention_heads,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let q = self.q_proj.forward(xs)?;
        let k = self.k_proj.forward(xs)?;
        let v = self.v_proj.forward(xs)?;
        self.out_proj
            .forward(&scaled_dot_product_attention(&q, &k, &v, self.heads, Some(mask))?)
    }
}

#[derive(Debug)]
struct EncoderLayer {
    self_attn: SelfAttention,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
    activation: ClipActivation,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, config: &ClipTextConfig, activation: ClipActivation) -> Result<Self> {
        let (d, eps) = (config.hidden_size, config.layer_norm_eps);
        Ok(Self {
            self_attn: SelfAttention::new(vb.pp("self_attn"), config)?,
            layer_norm1: layer_norm(d, eps, vb.pp("layer_norm1"))?,
            fc1: linear(d, config.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: linear(config.intermediate_size, d, vb.pp("mlp.fc2"))?,
            layer_norm2: layer_norm(d, eps, vb.pp("layer_norm2"))?,
            activation,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let xs = (self.self_attn.forward(&self.layer_norm1.forward(xs)?, mask)? + xs)?;
        let hidden = activate(&self.fc1.forward(&self.layer_norm2.forward(&xs)?)?, self.activation)?;
        self.fc2.forward(&hidden)? + xs
    }
}

/// Which hidden state a text encoder gives as its per-token output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipLayer {
    /// `last_hidden_state`: every layer, then the final layer norm.
    Last,
    /// transformers' `hidden_states[-k]` (k = 1 is the last layer's output), without the final
    /// norm: diffusers' SDXL prompt encoding (k = 2).
    FromEnd(usize),
    /// `hidden_states[-k]`, then the final layer norm: A1111's "Clip skip" k on SD 1.x
    /// (`FrozenCLIPEmbedderWithCustomWords.encode_with_transformers`), diffusers' `clip_skip`
    /// k - 1 (`StableDiffusionPipeline.encode_prompt`). k = 1 is [`ClipLayer::Last`].
    FromEndNormed(usize),
}

/// One encoder's outputs for a batch of token ids.
#[derive(Debug, Clone)]
pub struct ClipOutput {
    /// (b, tokens, hidden_size).
    pub hidden: Tensor,
    /// (b, projection_dim or hidden_size): the final-normed state at the pooled token, through
    /// `text_projection` when the model has one; when asked for.
    pub pooled: Option<Tensor>,
}

#[derive(Debug)]
pub struct ClipTextTransformer {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    max_positions: usize,
    eos_token_id: u32,
    activation: ClipActivation,
}

impl ClipTextTransformer {
    /// Builds the encoder; `vb` is at the root of the weights file, with or without the
    /// `text_model.` prefix. The config must have been validated.
    pub fn new(vb: VarBuilder, config: &ClipTextConfig) -> anyhow::Result<Self> {
        config.validate()?;
        let activation = config.activation()?;
        // `text_projection` sits beside `text_model`, at the root.
        let text_projection = if config.with_projection() || vb.contains_tensor("text_projection.weight") {
            let width = config.projection_dim.unwrap_or(config.hidden_size);
            Some(crate::model::linear::linear_no_bias(
                config.hidden_size,
                width,
                vb.pp("text_projection"),
            )?)
        } else {
            None
        };
        let vb = if vb.contains_tensor(&format!("{TEXT_MODEL_PREFIX}.final_layer_norm.weight")) {
            vb.pp(TEXT_MODEL_PREFIX)
        } else {
            vb
        };
        let d = config.hidden_size;
        let embeddings = vb.pp("embeddings");
        let layers = vb.pp("encoder.layers");
        Ok(Self {
            token_embedding: embedding(config.vocab_size, d, embeddings.pp("token_embedding"))?,
            position_embedding: embedding(config.max_position_embeddings, d, embeddings.pp("position_embedding"))?,
            layers: (0..config.num_hidden_layers)
                .map(|i| EncoderLayer::new(layers.pp(i), config, activation))
                .collect::<Result<_>>()?,
            final_layer_norm: layer_norm(d, config.layer_norm_eps, vb.pp("final_layer_norm"))?,
            text_projection,
            max_positions: config.max_position_embeddings,
            eos_token_id: config.eos_token_id,
            activation,
        })
    }

    /// The MLP activation: `quick_gelu` marks OpenAI's CLIP (SD 1.x, SDXL's first encoder),
    /// `gelu` OpenCLIP (SD 2.x, SDXL's second), which A1111 encodes by different code paths.
    pub fn activation(&self) -> ClipActivation {
        self.activation
    }

    /// The number of transformer layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Token ids (b, tokens), u32, -> last_hidden_state (b, tokens, hidden_size).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        Ok(self.encode(input_ids, ClipLayer::Last, false)?.hidden)
    }

    /// The pooled token of each row: transformers' `CLIPTextTransformer` rule (see
    /// [`ClipTextConfig::eos_token_id`]).
    fn pooled_positions(&self, input_ids: &Tensor) -> Result<Vec<u32>> {
        input_ids
            .to_vec2::<u32>()?
            .iter()
            .map(|row| {
                let position = if self.eos_token_id == 2 {
                    // argmax: the first of the highest ids.
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&id| id == max)
                } else {
                    row.iter().position(|&id| id == self.eos_token_id)
                };
                position
                    .map(|p| p as u32)
                    .ok_or_else(|| candle_core::Error::Msg("a text encoder input has no end-of-text token".into()))
            })
            .collect()
    }

    /// Token ids (b, tokens), u32, -> the hidden state `layer` says, and with `pooled` the
    /// pooled (and projected) output.
    pub fn encode(&self, input_ids: &Tensor, layer: ClipLayer, pooled: bool) -> Result<ClipOutput> {
        let (from_end, normed) = match layer {
            ClipLayer::Last => (1, true),
            ClipLayer::FromEnd(k) => (k, false),
            ClipLayer::FromEndNormed(k) => (k, true),
        };
        if !(1..=self.layers.len()).contains(&from_end) {
            candle_core::bail!(
                "hidden_states[-{from_end}] of a text encoder with {} layers",
                self.layers.len()
            );
        }
        let run_layers = self.layers.len() + 1 - from_end;
        let (_, tokens) = input_ids.dims2()?;
        if tokens > self.max_positions {
            candle_core::bail!(
                "{tokens} tokens exceed the text encoder's {} positions",
                self.max_positions
            );
        }
        let device = input_ids.device();
        let positions = Tensor::arange(0u32, tokens as u32, device)?;
        let mut xs = self
            .token_embedding
            .forward(input_ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        // (tokens, tokens), broadcast over batch and heads by the attention.
        let mask = causal_mask(tokens, device)?.to_dtype(DType::F32)?;
        let mut hidden = None;
        // The pooled output needs every layer; the hidden state may stop earlier.
        let needed = if pooled { self.layers.len() } else { run_layers };
        for (i, encoder_layer) in self.layers[..needed].iter().enumerate() {
            xs = encoder_layer.forward(&xs, &mask)?;
            if i + 1 == run_layers {
                hidden = Some(if normed {
                    self.final_layer_norm.forward(&xs)?
                } else {
                    xs.clone()
                });
            }
        }
        let hidden = hidden.ok_or_else(|| candle_core::Error::Msg("internal: the text encoder ran no layer".into()))?;
        let pooled = if pooled {
            let last = if run_layers == self.layers.len() && normed {
                hidden.clone()
            } else {
                self.final_layer_norm.forward(&xs)?
            };
            let positions = self.pooled_positions(input_ids)?;
            let rows = positions
                .iter()
                .enumerate()
                .map(|(b, &p)| last.get(b)?.get(p as usize))
                .collect::<Result<Vec<_>>>()?;
            let states = Tensor::stack(&rows, 0)?;
            Some(match &self.text_projection {
                Some(projection) => projection.forward(&states)?,
                None => states,
            })
        } else {
            None
        };
        Ok(ClipOutput { hidden, pooled })
    }
}
