//! diffusers' `Transformer2DModel` (continuous input) and its `BasicTransformerBlock`:
//! self-attention, cross-attention to the text, and a GEGLU feed-forward, each pre-normed with a
//! residual.

use std::sync::{Mutex, PoisonError};

use candle_core::{Module, Result, Tensor, TensorId};
use candle_nn::{layer_norm, LayerNorm, VarBuilder};

use crate::config::unet::TransformerSpec;
use crate::model::activation;
use crate::model::attention::scaled_dot_product_attention;
use crate::model::conv::{conv2d, Conv2d};
use crate::model::linear::{linear, linear_no_bias, Linear};
use crate::model::norm::{group_norm, GroupNorm};

/// diffusers' fixed epsilons inside `Transformer2DModel`: its group norm and its layer norms.
const TRANSFORMER_GROUP_NORM_EPS: f64 = 1e-6;
const TRANSFORMER_LAYER_NORM_EPS: f64 = 1e-5;
/// The feed-forward's hidden width, as a multiple of the model width (`FeedForward(mult=4)`).
const FEED_FORWARD_MULT: usize = 4;

/// diffusers' `Attention` with bias-free q/k/v and a biased output projection.
#[derive(Debug)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    /// Keys and values of the last context attended to, by the context tensor's id (candle never
    /// reuses one). The text embedding is the same tensor at every sampling step, so its
    /// projections are computed once per prompt; diffusers recomputes them each step.
    context_projections: Mutex<Option<(TensorId, Tensor, Tensor)>>,
}

impl Attention {
    /// `context_dim` is the key/value input width: the text's for cross-attention.
    pub fn new(vb: VarBuilder, query_dim: usize, context_dim: usize, heads: usize) -> Result<Self> {
        Ok(Self {
            to_q: linear_no_bias(query_dim, query_dim, vb.pp("to_q"))?,
            to_k: linear_no_bias(context_dim, query_dim, vb.pp("to_k"))?,
            to_v: linear_no_bias(context_dim, query_dim, vb.pp("to_v"))?,
            to_out: linear(query_dim, query_dim, vb.pp("to_out.0"))?,
            heads,
            context_projections: Mutex::new(None),
        })
    }

    /// `xs` (b, n, dim) attends to `context` (b, m, context_dim), or to itself when `None`.
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let q = self.to_q.forward(xs)?;
        let (k, v) = match context {
            None => (self.to_k.forward(xs)?, self.to_v.forward(xs)?),
            Some(context) => self.context_keys_values(context)?,
        };
        self.to_out
            .forward(&scaled_dot_product_attention(&q, &k, &v, self.heads, None)?)
    }

    /// `context`'s keys and values, from the cache when it is the tensor seen last. The lock is
    /// not held while projecting: the products run on the rayon pool.
    fn context_keys_values(&self, context: &Tensor) -> Result<(Tensor, Tensor)> {
        let cache = || self.context_projections.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((id, k, v)) = cache().as_ref() {
            if *id == context.id() {
                return Ok((k.clone(), v.clone()));
            }
        }
        let (k, v) = (self.to_k.forward(context)?, self.to_v.forward(context)?);
        *cache() = Some((context.id(), k.clone(), v.clone()));
        Ok((k, v))
    }
}

/// GEGLU feed-forward: `proj` to 2 x hidden, value * gelu(gate) with the exact erf GELU
/// (diffusers' `GEGLU`; candle-transformers uses the tanh approximation), then `net.2`.
#[derive(Debug)]
pub struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    pub fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let hidden = dim * FEED_FORWARD_MULT;
        Ok(Self {
            proj: linear(dim, hidden * 2, vb.pp("net.0.proj"))?,
            out: linear(hidden, dim, vb.pp("net.2"))?,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let projected = self.proj.forward(xs)?;
        self.out.forward(&activation::geglu(&projected)?)
    }
}

#[derive(Debug)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
    only_cross_attention: bool,
}

impl BasicTransformerBlock {
    pub fn new(vb: VarBuilder, dim: usize, spec: &TransformerSpec) -> Result<Self> {
        let attn1_context = if spec.only_cross_attention {
            spec.cross_attention_dim
        } else {
            dim
        };
        Ok(Self {
            norm1: layer_norm(dim, TRANSFORMER_LAYER_NORM_EPS, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), dim, attn1_context, spec.heads)?,
            norm2: layer_norm(dim, TRANSFORMER_LAYER_NORM_EPS, vb.pp("norm2"))?,
            attn2: Attention::new(vb.pp("attn2"), dim, spec.cross_attention_dim, spec.heads)?,
            norm3: layer_norm(dim, TRANSFORMER_LAYER_NORM_EPS, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
            only_cross_attention: spec.only_cross_attention,
        })
    }

    /// `xs` (b, hw, dim), `context` (b, tokens, cross_attention_dim).
    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let first_context = self.only_cross_attention.then_some(context);
        let xs = (self.attn1.forward(&self.norm1.forward(xs)?, first_context)? + xs)?;
        let xs = (self.attn2.forward(&self.norm2.forward(&xs)?, Some(context))? + &xs)?;
        self.ff.forward(&self.norm3.forward(&xs)?)? + xs
    }
}

/// `proj_in`/`proj_out`: linear layers over tokens (SD 2.x) or 1x1 convs over pixels (SD 1.x).
#[derive(Debug)]
enum Projection {
    Linear(Linear),
    Conv(Conv2d),
}

impl Projection {
    fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, use_linear: bool) -> Result<Self> {
        Ok(if use_linear {
            Self::Linear(linear(in_dim, out_dim, vb)?)
        } else {
            Self::Conv(conv2d(in_dim, out_dim, 1, 0, 1, vb)?)
        })
    }
}

#[derive(Debug)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        groups: usize,
        use_linear: bool,
        spec: &TransformerSpec,
    ) -> Result<Self> {
        let blocks = vb.pp("transformer_blocks");
        let transformer_blocks = (0..spec.layers)
            .map(|i| BasicTransformerBlock::new(blocks.pp(i), channels, spec))
            .collect::<Result<_>>()?;
        Ok(Self {
            norm: group_norm(groups, channels, TRANSFORMER_GROUP_NORM_EPS, vb.pp("norm"))?,
            proj_in: Projection::new(vb.pp("proj_in"), channels, channels, use_linear)?,
            transformer_blocks,
            proj_out: Projection::new(vb.pp("proj_out"), channels, channels, use_linear)?,
        })
    }

    /// `xs` (b, c, h, w), `context` (b, tokens, cross_attention_dim) -> (b, c, h, w).
    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (batch, channels, height, width) = xs.dims4()?;
        let to_tokens = |x: Tensor| -> Result<Tensor> {
            // (b, c, h, w) -> (b, hw, c)
            x.permute((0, 2, 3, 1))?.reshape((batch, height * width, channels))
        };
        let to_pixels = |x: Tensor| -> Result<Tensor> {
            // (b, hw, c) -> (b, c, h, w)
            x.reshape((batch, height, width, channels))?
                .permute((0, 3, 1, 2))?
                .contiguous()
        };
        let normed = self.norm.forward(xs)?;
        let mut hidden = match &self.proj_in {
            Projection::Linear(proj) => proj.forward(&to_tokens(normed)?)?,
            Projection::Conv(proj) => to_tokens(proj.forward(&normed)?)?,
        };
        for block in &self.transformer_blocks {
            hidden = block.forward(&hidden, context)?;
        }
        let out = match &self.proj_out {
            Projection::Linear(proj) => to_pixels(proj.forward(&hidden)?)?,
            Projection::Conv(proj) => proj.forward(&to_pixels(hidden)?)?,
        };
        out + xs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu_op::max_abs_diff;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn cross_attention_reuses_projections_only_for_the_same_context_tensor() {
        let dev = Device::Cpu;
        let weights = VarMap::new();
        let vb = VarBuilder::from_varmap(&weights, DType::F32, &dev);
        let cached = Attention::new(vb.clone(), 16, 8, 2).unwrap();
        let xs = Tensor::randn(0f32, 1., (2, 5, 16), &dev).unwrap();
        let context = Tensor::randn(0f32, 1., (2, 3, 8), &dev).unwrap();
        let other = (&context * 2.0).unwrap();
        // A second layer over the same weights has an empty cache at each call.
        let fresh = |ctx: &Tensor| {
            Attention::new(vb.clone(), 16, 8, 2)
                .unwrap()
                .forward(&xs, Some(ctx))
                .unwrap()
        };

        let first = cached.forward(&xs, Some(&context)).unwrap();
        assert!(max_abs_diff(&first, &fresh(&context)) < 1e-6);
        let again = cached.forward(&xs, Some(&context)).unwrap();
        assert_eq!(max_abs_diff(&again, &first), 0.0);
        // A different context is projected anew, not served from the cache.
        let switched = cached.forward(&xs, Some(&other)).unwrap();
        assert!(max_abs_diff(&switched, &fresh(&other)) < 1e-6);
        assert!(max_abs_diff(&switched, &first) > 1e-3);
        // Self-attention projects its own input at each call.
        let self_attention = Attention::new(vb.pp("attn1"), 16, 16, 2).unwrap();
        let own = self_attention.forward(&xs, None).unwrap();
        let shifted = self_attention.forward(&(&xs + 1.0).unwrap(), None).unwrap();
        let own_fresh = Attention::new(vb.pp("attn1"), 16, 16, 2).unwrap();
        assert!(max_abs_diff(&shifted, &own_fresh.forward(&(&xs + 1.0).unwrap(), None).unwrap()) < 1e-6);
        assert!(max_abs_diff(&own, &shifted) > 1e-3);
    }
}
