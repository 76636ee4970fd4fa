//! Our CLIP text transformer (transformers' `CLIPTextModel`), built from `text_encoder/config.json`.
//!
//! Output: `last_hidden_state` after the final layer norm, which is what SD conditions on (SD 2.x
//! ships a 23-layer OpenCLIP ViT-H config, so that is its penultimate layer). Unlike
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

#[derive(Debug)]
pub struct ClipTextTransformer {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    max_positions: usize,
}

impl ClipTextTransformer {
    /// Builds the encoder; `vb` is at the root of the weights file, with or without the
    /// `text_model.` prefix. The config must have been validated.
    pub fn new(vb: VarBuilder, config: &ClipTextConfig) -> anyhow::Result<Self> {
        config.validate()?;
        let activation = config.activation()?;
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
            max_positions: config.max_position_embeddings,
        })
    }

    /// Token ids (b, tokens), u32, -> last_hidden_state (b, tokens, hidden_size).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
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
        for layer in &self.layers {
            xs = layer.forward(&xs, &mask)?;
        }
        self.final_layer_norm.forward(&xs)
    }
}
