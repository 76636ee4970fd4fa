//! The 2-D convolution layer of the UNet and the VAE.
//!
//! On the CPU in f32 it runs our kernel ([`kernels::conv`], weights laid out tap-major once at
//! load); on CUDA in `cudnn` builds with `SDFIX_CUDA_CUDNN_CONV=1` ours on cuDNN
//! ([`kernels::cuda::cudnn_conv`]); elsewhere (CUDA, Metal, other dtypes) candle's conv2d: cuDNN
//! when built with `cudnn`.
//! Training (see [`crate::model`], "Training"): a weight that is a `Var` stays as stored, and
//! a call whose weight or input carries a gradient runs [`kernels::grad::conv2d`] (ours, with a
//! backward) on the CPU in f32, candle's conv2d elsewhere.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use crate::kernels;
use crate::kernels::conv::ConvSpec;
use crate::model::on_cpu_f32;

/// A convolution with square kernels, equal padding on all sides, dilation 1, one group: what
/// SD's UNet and VAE use.
#[derive(Debug, Clone)]
pub struct Conv2d {
    /// (c_out, c_in, k, k) as stored; (k, k, c_out, c_in) ("tap-major") when `tap_major`.
    weight: Tensor,
    bias: Option<Tensor>,
    spec: ConvSpec,
    tap_major: bool,
}

/// Loads `weight` (c_out, c_in, k, k) and `bias` (c_out) from `vb`, with candle-nn's
/// initialisation when `vb` creates them (random-weight benchmarks).
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    padding: usize,
    stride: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    load_conv2d(in_channels, out_channels, kernel, padding, stride, true, vb)
}

/// [`conv2d`] without a bias (TAESD's inner convolutions).
pub fn conv2d_no_bias(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    padding: usize,
    stride: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    load_conv2d(in_channels, out_channels, kernel, padding, stride, false, vb)
}

/// [`conv2d`] and [`conv2d_no_bias`]: the weight, then (`with_bias`) the bias, in the order
/// random-weight builders draw them.
fn load_conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    padding: usize,
    stride: usize,
    with_bias: bool,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let weight = vb.get_with_hints(
        (out_channels, in_channels, kernel, kernel),
        "weight",
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
    )?;
    let bias = if with_bias {
        let bound = 1. / ((in_channels * kernel * kernel) as f64).sqrt();
        Some(vb.get_with_hints(out_channels, "bias", candle_nn::Init::Uniform { lo: -bound, up: bound })?)
    } else {
        None
    };
    let spec = ConvSpec {
        in_channels,
        out_channels,
        kernel,
        padding,
        stride,
    };
    Conv2d::new(weight, bias, spec)
}

impl Conv2d {
    fn new(weight: Tensor, bias: Option<Tensor>, spec: ConvSpec) -> Result<Self> {
        // A trainable weight keeps its identity (its gradient is looked up by it).
        let tap_major = matches!(weight.device(), Device::Cpu) && weight.dtype() == DType::F32 && !weight.is_variable();
        let weight = if tap_major {
            // Prepared once at load, in the layout the kernel reads.
            kernels::conv::tap_major_weight(&weight)?
        } else {
            weight
        };
        Ok(Self {
            weight,
            bias,
            spec,
            tap_major,
        })
    }

    /// `xs` (b, c_in, h, w) -> (b, c_out, oh, ow).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let op = match self.spec.kernel {
            1 => "conv 1x1",
            3 => "conv 3x3",
            _ => "conv other",
        };
        kernels::profile::time(op, || self.forward_untimed(xs))
    }

    fn forward_untimed(&self, xs: &Tensor) -> Result<Tensor> {
        if self.tap_major && xs.dtype() == DType::F32 && matches!(xs.device(), Device::Cpu) && !xs.track_op() {
            return kernels::conv::conv2d_f32(xs, &self.weight, self.bias.as_ref(), self.spec);
        }
        let weight = if self.tap_major {
            &self.weight.permute((2, 3, 0, 1))?
        } else {
            &self.weight
        };
        if on_cpu_f32(xs) && on_cpu_f32(weight) {
            // The training path: our convolution with a backward.
            return kernels::grad::conv2d(xs, weight, self.bias.as_ref(), self.spec);
        }
        if let Some(bias) = &self.bias {
            if kernels::cuda::cudnn_conv::AVAILABLE
                && !xs.track_op()
                && !weight.track_op()
                && kernels::cuda_settings::lever_on(xs.device(), |s| s.cudnn_conv)
            {
                // Lever 2 (SDFIX_CUDA_CUDNN_CONV, cudnn builds): plans cached per shape.
                return kernels::cuda::cudnn_conv::conv2d(xs, weight, bias, self.spec);
            }
        }
        let ys = xs.conv2d(weight, self.spec.padding, self.spec.stride, 1, 1)?;
        match &self.bias {
            Some(bias) => ys.broadcast_add(&bias.reshape((1, (), 1, 1))?),
            None => Ok(ys),
        }
    }
}

impl candle_core::Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Conv2d::forward(self, xs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu_op::max_abs_diff;

    /// On the CPU in f32 the layer keeps tap-major weights and runs our kernel; the result is
    /// candle's convolution (the kernel's own tests cover the shapes).
    #[test]
    fn cpu_f32_layer_runs_the_kernel() {
        let dev = Device::Cpu;
        let xs = Tensor::randn(0f32, 1., (2, 4, 9, 7), &dev).unwrap();
        let weight = Tensor::randn(0f32, 1., (8, 4, 3, 3), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1., 8, &dev).unwrap();
        let expected = xs
            .conv2d(&weight, 1, 2, 1, 1)
            .unwrap()
            .broadcast_add(&bias.reshape((1, 8, 1, 1)).unwrap())
            .unwrap();
        let spec = ConvSpec {
            in_channels: 4,
            out_channels: 8,
            kernel: 3,
            padding: 1,
            stride: 2,
        };
        let conv = Conv2d::new(weight, Some(bias), spec).unwrap();
        assert!(conv.tap_major);
        assert!(max_abs_diff(&conv.forward(&xs).unwrap(), &expected) < 1e-4);
    }
}
