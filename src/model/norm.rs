//! The group normalisation layer, optionally followed by SiLU (every resnet and the output heads
//! of the UNet and the VAE apply `silu(group_norm(x))`).
//!
//! On the CPU in f32 it runs our fused kernel ([`kernels::norm`]); whenever the input or the
//! weights carry a gradient (see [`crate::model`], "Training"), [`kernels::grad::group_norm`]
//! (fused too, with a backward) on the CPU in f32; on CUDA with `SDFIX_CUDA_FUSED_NORM=1`
//! [`kernels::cuda::fused::group_norm`]; the same math as candle ops elsewhere. Also
//! the [`LayerNorm`] of the transformers and CLIP, for the same reason: candle-nn's fast layer
//! norm has no backward.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use crate::kernels;
use crate::model::on_cpu_f32;

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
        kernels::profile::time("group norm", || self.apply_untimed(xs, silu))
    }

    fn apply_untimed(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        let differentiable = xs.track_op() || self.weight.track_op() || self.bias.track_op();
        if xs.dtype() == DType::F32
            && matches!(xs.device(), Device::Cpu)
            && self.weight.dtype() == DType::F32
            && !differentiable
        {
            return kernels::norm::group_norm(xs, &self.weight, &self.bias, self.groups, self.eps, silu);
        }
        if on_cpu_f32(xs) && on_cpu_f32(&self.weight) && on_cpu_f32(&self.bias) {
            // The training path: fused, with a backward.
            return kernels::grad::group_norm(xs, &self.weight, &self.bias, self.groups, self.eps, silu);
        }
        if !differentiable
            && xs.dtype() == self.weight.dtype()
            && kernels::cuda_settings::lever_on(xs.device(), |s| s.fused_norm)
        {
            // Lever 4 (SDFIX_CUDA_FUSED_NORM): two launches in place of about ten.
            return kernels::cuda::fused::group_norm(xs, &self.weight, &self.bias, self.groups, self.eps, silu);
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
        kernels::norm::composite(xs, &self.weight, &self.bias, self.groups, self.eps)
    }
}

/// `LayerNorm(dim, eps)` over the last dimension (PyTorch's, with affine weight and bias).
///
/// candle-nn's fused layer norm (`apply_op3_no_bwd`) would drop the gradient silently, so a call
/// whose input or weights carry a gradient runs the same math as basic candle ops.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    inner: candle_nn::LayerNorm,
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

/// Loads `weight` and `bias` (dim) from `vb`; ones and zeros when `vb` creates them.
pub fn layer_norm(dim: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    let weight = vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.))?;
    let bias = vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.))?;
    Ok(LayerNorm {
        inner: candle_nn::LayerNorm::new(weight.clone(), bias.clone(), eps),
        weight,
        bias,
        eps,
    })
}

impl candle_core::Module for LayerNorm {
    /// `xs` (..., dim) normalised over the last dimension.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if xs.track_op() || self.weight.track_op() || self.bias.track_op() {
            if on_cpu_f32(xs) && on_cpu_f32(&self.weight) && on_cpu_f32(&self.bias) {
                return kernels::grad::layer_norm(xs, &self.weight, &self.bias, self.eps);
            }
            candle_nn::ops::layer_norm_slow(xs, &self.weight, &self.bias, self.eps as f32)
        } else {
            self.inner.forward(xs)
        }
    }
}

impl candle_core::Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        GroupNorm::forward(self, xs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu_op::max_rel_diff;

    /// Both paths against candle-nn: the CPU f32 layer (our kernel) and the composite path (what
    /// GPUs and f16 run), with and without the SiLU.
    #[test]
    fn both_paths_match_candle_nn() {
        let dev = Device::Cpu;
        for &(b, c, h, w, g) in &[(2, 8, 5, 7, 4), (1, 32, 16, 16, 32), (2, 64, 9, 9, 32)] {
            // An offset mean stresses the variance.
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
            assert!(max_rel_diff(&ours.forward(&xs).unwrap(), &expected) < 2e-5);
            assert!(max_rel_diff(&ours.forward_silu(&xs).unwrap(), &expected.silu().unwrap()) < 2e-5);
            // The composite path, plain f32: fine unless a group is a couple of values 20 apart
            // from zero (hence no (3, 6, 1, 1, 3) case here, unlike the kernel's test).
            let composite = ours.composite(&xs).unwrap();
            assert!(max_rel_diff(&composite, &expected) < 1e-4, "{b} {c} {h} {w} {g}");
        }
    }
}
