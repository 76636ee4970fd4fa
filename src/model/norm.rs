//! Group normalisation, optionally followed by SiLU (every resnet and the output heads of the UNet
//! and the VAE apply `silu(group_norm(x))`).
//!
//! On the CPU in f32 it is one fused kernel: one pass for each group's sum and sum of squares
//! (f64 accumulators), one pass that normalises, applies the per-channel scale and shift and the
//! SiLU. candle-nn's GroupNorm is eight tensor ops (mean, subtract, square, mean, sqrt, divide,
//! scale, shift), each a full pass with its own allocation, plus one more for the SiLU.
//! Elsewhere the same math runs as candle ops.

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use crate::model::cpu_math;
use crate::model::cpu_op::contiguous_f32;
use crate::model::op_profile;

/// diffusers' / PyTorch's `GroupNorm(num_groups, num_channels, eps, affine=True)`.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

/// Loads `weight` and `bias` (channels) from `vb`; ones and zeros when `vb` creates them.
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    if groups == 0 || !channels.is_multiple_of(groups) {
        candle_core::bail!("group norm: {channels} channels do not split into {groups} groups")
    }
    let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
    let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
    Ok(GroupNorm {
        weight,
        bias,
        groups,
        eps,
    })
}

impl GroupNorm {
    /// `xs` (b, c, ...) normalised over each group's channels and all positions.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.apply(xs, false)
    }

    /// `silu(group_norm(xs))` in one pass on the CPU.
    pub fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        self.apply(xs, true)
    }

    fn apply(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        op_profile::time("group norm", || self.apply_untimed(xs, silu))
    }

    fn apply_untimed(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        if xs.dtype() == DType::F32 && matches!(xs.device(), Device::Cpu) && self.weight.dtype() == DType::F32 {
            let op = CpuGroupNorm {
                groups: self.groups,
                eps: self.eps,
                silu,
            };
            return xs.contiguous()?.apply_op3_no_bwd(&self.weight, &self.bias, &op);
        }
        let ys = self.composite(xs)?;
        if silu {
            ys.silu()
        } else {
            Ok(ys)
        }
    }

    /// The same normalisation as candle ops, statistics in f32 (for f16/bf16 inputs too).
    fn composite(&self, xs: &Tensor) -> Result<Tensor> {
        let dims = xs.dims();
        let (batch, channels) = (dims[0], dims[1]);
        let dtype = xs.dtype();
        let grouped = xs.reshape((batch, self.groups, ()))?.to_dtype(DType::F32)?;
        let mean = grouped.mean_keepdim(2)?;
        let centred = grouped.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(2)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let mut shape = vec![1, channels];
        shape.extend(std::iter::repeat_n(1, dims.len() - 2));
        let normed = normed.reshape(dims)?.to_dtype(dtype)?;
        normed
            .broadcast_mul(&self.weight.reshape(shape.as_slice())?)?
            .broadcast_add(&self.bias.reshape(shape.as_slice())?)
    }
}

impl candle_core::Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        GroupNorm::forward(self, xs)
    }
}

struct CpuGroupNorm {
    groups: usize,
    eps: f64,
    silu: bool,
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
    use crate::model::cpu_op::max_abs_diff;

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        max_abs_diff(a, b) / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

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
            let ours = GroupNorm {
                weight,
                bias,
                groups: g,
                eps: 1e-5,
            };
            let fused = ours.forward(&xs).unwrap();
            let diff = max_rel_diff(&fused, &expected);
            assert!(diff < 2e-5, "{b} {c} {h} {w} {g}: {diff:e}");
            let fused_silu = ours.forward_silu(&xs).unwrap();
            assert!(max_rel_diff(&fused_silu, &expected.silu().unwrap()) < 2e-5);
            // The composite path (what GPUs and f16 run), plain f32: fine unless a group is a
            // couple of values 20 apart from zero (the (3, 6, 1, 1, 3) case).
            if c / g * h * w >= 16 {
                let composite = ours.composite(&xs).unwrap();
                assert!(max_rel_diff(&composite, &expected) < 1e-4);
            }
        }
    }

    #[test]
    fn three_dimensional_inputs_work() {
        let dev = Device::Cpu;
        let xs = Tensor::randn(0f32, 1., (2, 4, 10), &dev).unwrap();
        let norm = GroupNorm {
            weight: Tensor::ones(4, DType::F32, &dev).unwrap(),
            bias: Tensor::zeros(4, DType::F32, &dev).unwrap(),
            groups: 2,
            eps: 1e-6,
        };
        let ys = norm.forward(&xs).unwrap();
        let per_group = ys.reshape((2, 2, 20)).unwrap();
        let mean = per_group.mean_keepdim(2).unwrap().abs().unwrap().max_all().unwrap();
        assert!(mean.to_scalar::<f32>().unwrap() < 1e-5);
    }
}
