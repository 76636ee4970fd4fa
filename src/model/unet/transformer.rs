//! diffusers' `Transformer2DModel` (continuous input) and its `BasicTransformerBlock`:
//! self-attention, cross-attention to the text, and a GEGLU feed-forward, each pre-normed with a
//! residual.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::unet::TransformerSpec;
use crate::model::activation;
use crate::model::attention::scaled_dot_product_attention;
use crate::model::conv::{conv2d, Conv2d};
use crate::model::linear::{linear, linear_no_bias, Linear};
use crate::model::norm::{group_norm, layer_norm, GroupNorm, LayerNorm};

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
}

/// The keys and values every cross-attention layer projects from the text context. The context
/// is the same at every sampling step, so they are computed at the first UNet pass and reused at
/// the others (diffusers recomputes them each step). The caller owns the cache for as long as the
/// context stays the same (the pipeline: one batch) and passes it to each UNet call, as candle's
/// models take `&mut Cache`; a new context needs a new cache.
#[derive(Debug, Default)]
pub struct CrossAttentionCache {
    /// (keys, values) per cross-attention layer, in the order a UNet pass reaches them.
    keys_values: Vec<(Tensor, Tensor)>,
    /// The layer the pass in progress reaches next.
    next_layer: usize,
}

impl CrossAttentionCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Called at the start of each UNet pass: the layers are reached in the same order every pass.
    pub fn start_pass(&mut self) {
        self.next_layer = 0;
    }

    /// The next layer's keys and values: cached, or made by `project` and kept.
    fn next_keys_values(&mut self, project: impl FnOnce() -> Result<(Tensor, Tensor)>) -> Result<(Tensor, Tensor)> {
        let layer = self.next_layer;
        self.next_layer += 1;
        if let Some(cached) = self.keys_values.get(layer) {
            return Ok(cached.clone());
        }
        let projected = project()?;
        self.keys_values.push(projected.clone());
        Ok(projected)
    }
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
        })
    }

    /// `xs` (b, n, dim) attends to itself.
    pub fn forward_self(&self, xs: &Tensor) -> Result<Tensor> {
        let (k, v) = (self.to_k.forward(xs)?, self.to_v.forward(xs)?);
        self.attend(xs, &k, &v)
    }

    /// `xs` (b, n, dim) attends to `context` (b, m, context_dim), whose keys and values come from
    /// `cache` after the first pass.
    pub fn forward_cross(&self, xs: &Tensor, context: &Tensor, cache: &mut CrossAttentionCache) -> Result<Tensor> {
        let (k, v) = cache.next_keys_values(|| Ok((self.to_k.forward(context)?, self.to_v.forward(context)?)))?;
        self.attend(xs, &k, &v)
    }

    fn attend(&self, xs: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let q = self.to_q.forward(xs)?;
        self.to_out
            .forward(&scaled_dot_product_attention(&q, k, v, self.heads, None)?)
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
    pub fn forward(&self, xs: &Tensor, context: &Tensor, cache: &mut CrossAttentionCache) -> Result<Tensor> {
        let normed = self.norm1.forward(xs)?;
        let first = if self.only_cross_attention {
            self.attn1.forward_cross(&normed, context, cache)?
        } else {
            self.attn1.forward_self(&normed)?
        };
        let xs = (first + xs)?;
        let xs = (self.attn2.forward_cross(&self.norm2.forward(&xs)?, context, cache)? + &xs)?;
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
    pub fn forward(&self, xs: &Tensor, context: &Tensor, cache: &mut CrossAttentionCache) -> Result<Tensor> {
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
            hidden = block.forward(&hidden, context, cache)?;
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

    /// The cache serves each layer its own keys and values from the second pass on, equal to a
    /// fresh projection; a new cache (a new context) projects anew.
    #[test]
    fn cross_attention_cache_serves_each_layer_its_own_projections() {
        let dev = Device::Cpu;
        let weights = VarMap::new();
        let vb = VarBuilder::from_varmap(&weights, DType::F32, &dev);
        let first = Attention::new(vb.pp("a"), 16, 8, 2).unwrap();
        let second = Attention::new(vb.pp("b"), 16, 8, 2).unwrap();
        let xs = Tensor::randn(0f32, 1., (2, 5, 16), &dev).unwrap();
        let context = Tensor::randn(0f32, 1., (2, 3, 8), &dev).unwrap();
        let other = (&context * 2.0).unwrap();
        let pass = |cache: &mut CrossAttentionCache, ctx: &Tensor| {
            cache.start_pass();
            let a = first.forward_cross(&xs, ctx, cache).unwrap();
            let b = second.forward_cross(&xs, ctx, cache).unwrap();
            (a, b)
        };
        let mut cache = CrossAttentionCache::new();
        let (a1, b1) = pass(&mut cache, &context);
        let (a2, b2) = pass(&mut cache, &context);
        assert_eq!(max_abs_diff(&a1, &a2), 0.0);
        assert_eq!(max_abs_diff(&b1, &b2), 0.0);
        assert!(max_abs_diff(&a1, &b1) > 1e-3, "each layer has its own slot");
        let mut fresh = CrossAttentionCache::new();
        let (a3, _) = pass(&mut fresh, &other);
        assert!(max_abs_diff(&a3, &a1) > 1e-3, "a new cache projects the new context");
        // Without a cache at all (one pass), the same numbers.
        let (a4, _) = pass(&mut CrossAttentionCache::new(), &context);
        assert!(max_abs_diff(&a4, &a1) < 1e-6);
    }
}
