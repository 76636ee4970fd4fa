//! Scaled dot-product attention, the one implementation behind every self- and cross-attention
//! in the UNet and the text encoder.
//!
//! Scores and softmax are computed in f32 whatever the input dtype (diffusers' `upcast_attention`
//! does this for q·k; SD 2.1 768-v overflows f16 without it), then cast back for the product with
//! v. Callers pass (batch, tokens, heads * head_dim) tensors and never see the layout, so a
//! memory-efficient (key-chunked) or fused kernel can replace the body without touching them.

use candle_core::{DType, Result, Tensor};

/// Multi-head attention of `query` (b, n, h*d) over `key`/`value` (b, m, h*d), `heads` heads,
/// scores scaled by 1/sqrt(d), plus `mask` (broadcastable to (b, h, n, m), f32) when given.
/// Returns (b, n, h*d).
pub fn scaled_dot_product_attention(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (batch, queries, inner) = query.dims3()?;
    let keys = key.dim(1)?;
    let head_dim = inner / heads;
    let dtype = query.dtype();
    let split = |x: &Tensor, tokens: usize| -> Result<Tensor> {
        // (b, tokens, h*d) -> (b, h, tokens, d)
        x.reshape((batch, tokens, heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let q = split(query, queries)?.to_dtype(DType::F32)?;
    let k = split(key, keys)?.to_dtype(DType::F32)?;
    let v = split(value, keys)?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    // (b, h, n, m)
    let mut scores = (q.matmul(&k.t()?)? * scale)?;
    if let Some(mask) = mask {
        scores = scores.broadcast_add(mask)?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
    // (b, h, n, d) -> (b, n, h*d)
    probs.matmul(&v)?.transpose(1, 2)?.reshape((batch, queries, inner))
}

/// An additive causal mask (0 on and below the diagonal, -inf above), (tokens, tokens), f32.
pub fn causal_mask(tokens: usize, device: &candle_core::Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..tokens)
        .flat_map(|i| (0..tokens).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (tokens, tokens), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn one_key_returns_its_value() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (2, 3, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (2, 1, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (2, 1, 8), &dev).unwrap();
        let out = scaled_dot_product_attention(&q, &k, &v, 2, None).unwrap();
        let expected = v.broadcast_as((2, 3, 8)).unwrap();
        let diff = (out - expected)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6);
    }

    #[test]
    fn causal_mask_hides_the_future() {
        let m = causal_mask(3, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(m[0][1], f32::NEG_INFINITY);
        assert_eq!(m[2][0], 0.0);
        assert_eq!(m[1][1], 0.0);
    }
}
