//! Scaled dot-product attention, the one function behind every self- and cross-attention in the
//! UNet, the VAE and the text encoder.
//!
//! On the CPU in f32 (with at most a 2-D mask) it runs our flash-style kernel
//! ([`kernels::attention`]); when an input carries a gradient (see [`crate::model`],
//! "Training"), [`kernels::grad::attention`] on the CPU in f32; on CUDA with
//! `SDFIX_CUDA_FLASH_ATTENTION=1`, unmasked f16/bf16 with head dim 40/64/80/160,
//! [`kernels::cuda::attention`]; elsewhere the composite path, as candle ops
//! ([`kernels::attention::composite`]). Scores and softmax are computed in f32 whatever the input
//! dtype (diffusers' `upcast_attention` does this for q·k;
//! SD 2.1 768-v overflows f16 without it), then cast back for the product with v. Callers pass
//! (batch, tokens, heads * head_dim) tensors and never see the layout, so another kernel can
//! replace either path without touching them.

use candle_core::{Device, Result, Tensor};

use crate::kernels;
use crate::model::on_cpu_f32;

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
    let cpu_f32 = |t: &Tensor| on_cpu_f32(t) && !t.track_op();
    let mask_2d = mask.map(|m| m.rank() == 2).unwrap_or(true);
    let kernel = cpu_f32(query) && cpu_f32(key) && cpu_f32(value) && mask_2d && mask.is_none_or(cpu_f32);
    let training_kernel =
        on_cpu_f32(query) && on_cpu_f32(key) && on_cpu_f32(value) && mask.is_none_or(|m| m.rank() == 2);
    kernels::profile::time("attention", || {
        if kernel {
            kernels::attention::attention(query, key, value, heads, mask)
        } else if training_kernel {
            // An input carries a gradient: ours, with a backward.
            kernels::grad::attention(query, key, value, heads, mask)
        } else if mask.is_none() && flash_kernel(query, key, value, heads) {
            // Lever 3 (SDFIX_CUDA_FLASH_ATTENTION): scores never leave shared memory.
            kernels::cuda::attention::flash_attention(query, key, value, heads)
        } else {
            kernels::attention::composite(query, key, value, heads, mask)
        }
    })
}

/// Whether lever 3's CUDA kernel takes this attention: switched on, on CUDA, no gradient, f16 or
/// bf16 alike with a head dim it is built for.
fn flash_kernel(query: &Tensor, key: &Tensor, value: &Tensor, heads: usize) -> bool {
    let dtype = query.dtype();
    let head_dim = query.dim(2).map(|inner| inner / heads.max(1)).unwrap_or(0);
    !(query.track_op() || key.track_op() || value.track_op())
        && key.dtype() == dtype
        && value.dtype() == dtype
        && kernels::cuda::attention::supports(dtype, head_dim)
        && kernels::cuda_settings::lever_on(query.device(), |s| s.flash_attention)
}

/// An additive causal mask (0 on and below the diagonal, -inf above), (tokens, tokens), f32.
pub fn causal_mask(tokens: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..tokens)
        .flat_map(|i| (0..tokens).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (tokens, tokens), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu_op::max_abs_diff;
    use candle_core::DType;

    #[test]
    fn one_key_returns_its_value() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (2, 3, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (2, 1, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (2, 1, 8), &dev).unwrap();
        let out = scaled_dot_product_attention(&q, &k, &v, 2, None).unwrap();
        let expected = v.broadcast_as((2, 3, 8)).unwrap();
        assert!(max_abs_diff(&out, &expected) < 1e-6);
    }

    /// The CPU kernel against the composite candle-op path (forced through f64 inputs cast
    /// back), with and without a mask, several heads, several query and key blocks (a causal
    /// mask over 600 keys leaves early rows with whole key blocks masked out).
    #[test]
    fn cpu_kernel_matches_the_composite_path() {
        let dev = Device::Cpu;
        for &(b, n, m, heads, d) in &[
            (2, 5, 7, 2, 4),
            (1, 300, 1000, 3, 8),
            (2, 77, 77, 4, 16),
            (1, 600, 600, 2, 8),
        ] {
            let q = Tensor::randn(0f32, 1., (b, n, heads * d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1., (b, m, heads * d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1., (b, m, heads * d), &dev).unwrap();
            let mask = (n == m).then(|| causal_mask(n, &dev).unwrap());
            let ours = scaled_dot_product_attention(&q, &k, &v, heads, mask.as_ref()).unwrap();
            let as_f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let mask64 = mask.as_ref().map(as_f64);
            let reference = scaled_dot_product_attention(&as_f64(&q), &as_f64(&k), &as_f64(&v), heads, mask64.as_ref())
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            assert!(max_abs_diff(&ours, &reference) < 1e-5, "{b} {n} {m} {heads} {d}");
        }
    }

    #[test]
    fn causal_mask_hides_the_future() {
        let m = causal_mask(3, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(m[0][1], f32::NEG_INFINITY);
        assert_eq!(m[2][0], 0.0);
        assert_eq!(m[1][1], 0.0);
    }
}
