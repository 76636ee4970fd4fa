//! Group normalisation, optionally followed by SiLU, on the CPU in f32, as one fused candle
//! custom op: one pass for each group's sum and sum of squares (f64 accumulators), one pass that
//! normalises, applies the per-channel scale and shift and the SiLU. candle-nn's GroupNorm is
//! eight tensor ops (mean, subtract, square, mean, sqrt, divide, scale, shift), each a full pass
//! with its own allocation, plus one more for the SiLU.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::kernels::cpu_math;
use crate::kernels::cpu_op::contiguous_f32;

/// `xs` (b, c, ...), f32 on the CPU (made contiguous), normalised over each of `groups` groups of
/// channels and all positions, times `weight` (c) plus `bias` (c); then SiLU when `silu`.
pub fn group_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, groups: usize, eps: f64, silu: bool) -> Result<Tensor> {
    let op = CpuGroupNorm { groups, eps, silu };
    xs.contiguous()?.apply_op3_no_bwd(weight, bias, &op)
}

/// The same group norm as candle ops, on any device and dtype, statistics in f32 (for f16/bf16
/// inputs too), the normalised values cast back to the input's dtype before the scale and shift:
/// [`crate::model::norm::GroupNorm`]'s fallback, and the reference of the CUDA kernel's checks
/// ([`super::cuda::parity`]).
pub fn composite(xs: &Tensor, weight: &Tensor, bias: &Tensor, groups: usize, eps: f64) -> Result<Tensor> {
    let dims = xs.dims();
    let (batch, channels) = (dims[0], dims[1]);
    let dtype = xs.dtype();
    let grouped = xs.reshape((batch, groups, ()))?.to_dtype(DType::F32)?;
    let mean = grouped.mean_keepdim(2)?;
    let centred = grouped.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(2)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    let mut shape = vec![1, channels];
    shape.extend(std::iter::repeat_n(1, dims.len() - 2));
    let normed = normed.reshape(dims)?.to_dtype(dtype)?;
    normed
        .broadcast_mul(&weight.reshape(shape.as_slice())?)?
        .broadcast_add(&bias.reshape(shape.as_slice())?)
}

pub(crate) struct CpuGroupNorm {
    pub(crate) groups: usize,
    pub(crate) eps: f64,
    pub(crate) silu: bool,
}

impl CustomOp3 for CpuGroupNorm {
    fn name(&self) -> &'static str {
        "sdfix-group-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let xs = contiguous_f32(s1, l1, "group norm")?;
        let (weight, bias) = (
            contiguous_f32(s2, l2, "group norm")?,
            contiguous_f32(s3, l3, "group norm")?,
        );
        let dims = l1.shape().dims();
        if dims.len() < 2 {
            candle_core::bail!("group norm: expected (batch, channels, ...), got {:?}", dims)
        }
        let channels = dims[1];
        if weight.len() != channels || bias.len() != channels || !channels.is_multiple_of(self.groups) {
            candle_core::bail!(
                "group norm: {channels} channels, {} weights, {} groups",
                weight.len(),
                self.groups
            )
        }
        let positions: usize = dims[2..].iter().product();
        let group_len = channels / self.groups * positions;
        if xs.is_empty() {
            return Ok((CpuStorage::F32(Vec::new()), l1.shape().clone()));
        }
        // Filled in place, not zeroed first (for the VAE's last blocks that saved a 134 MB
        // memset per call): every group writes all its elements.
        let mut out: Vec<f32> = Vec::with_capacity(xs.len());
        out.spare_capacity_mut()[..xs.len()]
            .par_chunks_mut(group_len)
            .zip(xs.par_chunks(group_len))
            .enumerate()
            .for_each(|(index, (dst, src))| {
                // Sums of (x - pivot), pivot = the first element, so a large mean does not
                // cancel the variance away.
                let pivot = src[0];
                let mut sums = [0f64; 2];
                cpu_math::shifted_sums(src, pivot, &mut sums);
                let [sum, sum_sq] = sums;
                let n = group_len as f64;
                let shifted_mean = sum / n;
                let var = (sum_sq / n - shifted_mean * shifted_mean).max(0.0);

                let inv_std = 1.0 / (var + self.eps).sqrt();
                let first_channel = (index % self.groups) * (channels / self.groups);
                for (c, (dst, src)) in dst.chunks_mut(positions).zip(src.chunks(positions)).enumerate() {
                    // (x - mean) w / std + b, as (x - pivot) scale + shift: x - pivot is small
                    // when x is, so a large mean costs no precision.
                    let scale = weight[first_channel + c] as f64 * inv_std;
                    let shift = bias[first_channel + c] as f64 - shifted_mean * scale;
                    cpu_math::scale_shift(dst, src, pivot, scale as f32, shift as f32, self.silu);
                }
            });
        // SAFETY: the groups above cover all xs.len() elements, each written by scale_shift.
        unsafe { out.set_len(xs.len()) };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu_op::max_rel_diff;
    use candle_core::{DType, Device};

    #[test]
    fn fused_kernel_matches_candle_nn() {
        let dev = Device::Cpu;
        for &(b, c, h, w, g) in &[(2, 8, 5, 7, 4), (1, 32, 16, 16, 32), (3, 6, 1, 1, 3), (2, 64, 9, 9, 32)] {
            // An offset mean stresses the one-pass variance.
            let xs = (Tensor::randn(0f32, 3., (b, c, h, w), &dev).unwrap() + 20.0).unwrap();
            let weight = Tensor::randn(1f32, 0.5, c, &dev).unwrap();
            let bias = Tensor::randn(0f32, 0.5, c, &dev).unwrap();
            // The reference in f64: in f32 it loses more to cancellation than we do.
            let f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let reference = candle_nn::GroupNorm::new(f64(&weight), f64(&bias), c, g, 1e-5).unwrap();
            let expected = candle_core::Module::forward(&reference, &f64(&xs))
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let fused = group_norm(&xs, &weight, &bias, g, 1e-5, false).unwrap();
            let diff = max_rel_diff(&fused, &expected);
            assert!(diff < 2e-5, "{b} {c} {h} {w} {g}: {diff:e}");
            let fused_silu = group_norm(&xs, &weight, &bias, g, 1e-5, true).unwrap();
            assert!(max_rel_diff(&fused_silu, &expected.silu().unwrap()) < 2e-5);
        }
    }

    #[test]
    fn three_dimensional_inputs_work() {
        let dev = Device::Cpu;
        let xs = Tensor::randn(0f32, 1., (2, 4, 10), &dev).unwrap();
        let weight = Tensor::ones(4, DType::F32, &dev).unwrap();
        let bias = Tensor::zeros(4, DType::F32, &dev).unwrap();
        let ys = group_norm(&xs, &weight, &bias, 2, 1e-6, false).unwrap();
        let per_group = ys.reshape((2, 2, 20)).unwrap();
        let mean = per_group.mean_keepdim(2).unwrap().abs().unwrap().max_all().unwrap();
        assert!(mean.to_scalar::<f32>().unwrap() < 1e-5);
    }
}
