//! The linear layers (`x @ W^T + b`) of the UNet's transformers, the time embedding and CLIP.
//!
//! On the CPU in f32 they run our kernel ([`kernels::linear`], the weight transposed once at
//! load); elsewhere candle-nn's Linear. Training (see [`crate::model`], "Training"): a `Var`
//! weight, or an input that carries a gradient, runs [`kernels::grad::linear`] (ours, with a
//! backward) on the CPU in f32, candle-nn's Linear elsewhere.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::kernels;
use crate::model::on_cpu_f32;

#[derive(Debug, Clone)]
pub enum Linear {
    /// CPU, f32: the weight transposed once at load to (in, out), so the products read it with
    /// unit stride along the output features and the gemm crate need not repack it per call.
    Cpu {
        weight_t: Tensor,
        bias: Option<Tensor>,
    },
    Candle(candle_nn::Linear),
}

/// `weight` (out, in) and `bias` (out) from `vb`, with candle-nn's initialisation.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let layer = candle_nn::linear(in_dim, out_dim, vb)?;
    Linear::new(layer.weight().clone(), layer.bias().cloned())
}

/// As [`linear`], without a bias.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let layer = candle_nn::linear_no_bias(in_dim, out_dim, vb)?;
    Linear::new(layer.weight().clone(), None)
}

impl Linear {
    /// Wraps existing weights (out, in) and bias (out).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        if weight.dtype() == DType::F32 && matches!(weight.device(), Device::Cpu) && !weight.is_variable() {
            Ok(Self::Cpu {
                weight_t: kernels::linear::transposed_weight(&weight)?,
                bias: bias.map(|b| b.contiguous()).transpose()?,
            })
        } else {
            Ok(Self::Candle(candle_nn::Linear::new(weight, bias)))
        }
    }
}

impl Module for Linear {
    /// `xs` (..., in) -> (..., out).
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let shape = || {
            let in_dim = xs.dims().last().copied().unwrap_or(0);
            let out_dim = match self {
                Self::Cpu { weight_t, .. } => weight_t.dims().last().copied().unwrap_or(0),
                Self::Candle(layer) => layer.weight().dims().first().copied().unwrap_or(0),
            };
            format!("{}x{in_dim}x{out_dim}", xs.elem_count() / in_dim.max(1))
        };
        kernels::profile::time_detailed("linear", shape, || match self {
            Self::Cpu { weight_t, bias } if !xs.track_op() => kernels::linear::linear_f32(xs, weight_t, bias.as_ref()),
            Self::Cpu { weight_t, bias } if on_cpu_f32(xs) => kernels::grad::linear(xs, &weight_t.t()?, bias.as_ref()),
            Self::Cpu { weight_t, bias } => {
                let ys = xs.broadcast_matmul(weight_t)?;
                match bias {
                    Some(bias) => ys.broadcast_add(bias),
                    None => Ok(ys),
                }
            }
            // The training path on the CPU: ours, with a backward.
            Self::Candle(layer) if on_cpu_f32(xs) && on_cpu_f32(layer.weight()) => {
                kernels::grad::linear(xs, layer.weight(), layer.bias())
            }
            Self::Candle(layer) => layer.forward(xs),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu_op::max_abs_diff;

    /// On the CPU in f32 the layer runs our kernel; the result is candle-nn's (the kernel's own
    /// tests cover the shapes).
    #[test]
    fn cpu_f32_layer_runs_the_kernel() {
        let dev = Device::Cpu;
        let xs = Tensor::randn(0f32, 1., (2, 7, 5), &dev).unwrap();
        let weight = Tensor::randn(0f32, 1., (3, 5), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1., 3, &dev).unwrap();
        let expected = candle_nn::Linear::new(weight.clone(), Some(bias.clone()))
            .forward(&xs)
            .unwrap();
        let ours = Linear::new(weight, Some(bias)).unwrap();
        assert!(matches!(ours, Linear::Cpu { .. }));
        assert!(max_abs_diff(&ours.forward(&xs).unwrap(), &expected) < 1e-4);
    }
}
