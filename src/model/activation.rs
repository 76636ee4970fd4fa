//! The GELU activations of the UNet's feed-forward (GEGLU) and of CLIP: our fused kernels
//! ([`kernels::activation`]) on the CPU in f32; when the input carries a gradient (see
//! [`crate::model`], "Training"), [`kernels::grad`]'s, with a backward; on CUDA with
//! `SDFIX_CUDA_FUSED_NORM=1` our fused GEGLU ([`kernels::cuda::fused`]); candle ops elsewhere.

use candle_core::{Result, Tensor};

use crate::kernels;
use crate::model::on_cpu_f32;

/// Inference on the CPU in f32: our fused kernels.
fn cpu_f32(xs: &Tensor) -> bool {
    on_cpu_f32(xs) && !xs.track_op()
}

/// The training path on the CPU: ours, with a backward.
fn cpu_f32_training(xs: &Tensor) -> bool {
    on_cpu_f32(xs) && xs.track_op()
}

/// The exact (erf) GELU.
pub fn gelu_erf(xs: &Tensor) -> Result<Tensor> {
    kernels::profile::time("gelu", || {
        if cpu_f32(xs) {
            kernels::activation::gelu_erf(xs)
        } else if cpu_f32_training(xs) {
            kernels::grad::gelu_erf(xs)
        } else {
            xs.gelu_erf()
        }
    })
}

/// diffusers' GEGLU: the last dimension halves into value and gate, `value * gelu_erf(gate)`.
pub fn geglu(projected: &Tensor) -> Result<Tensor> {
    kernels::profile::time("gelu", || {
        if cpu_f32(projected) {
            kernels::activation::geglu(projected)
        } else if cpu_f32_training(projected) {
            kernels::grad::geglu(projected)
        } else if !projected.track_op() && kernels::cuda_settings::lever_on(projected.device(), |s| s.fused_norm) {
            // Lever 4 (SDFIX_CUDA_FUSED_NORM): one launch in place of four.
            kernels::cuda::fused::geglu(projected)
        } else {
            kernels::activation::composite_geglu(projected)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu_op::max_abs_diff;
    use candle_core::{DType, Device};

    /// The CPU f32 path (our kernels) and the candle-op path (f64 here) agree.
    #[test]
    fn both_paths_agree() {
        let xs = Tensor::randn(0f32, 2., (3, 5, 40), &Device::Cpu).unwrap();
        let as_f64 = xs.to_dtype(DType::F64).unwrap();
        let via_candle = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        assert!(max_abs_diff(&gelu_erf(&xs).unwrap(), &via_candle(gelu_erf(&as_f64).unwrap())) < 1e-5);
        assert!(max_abs_diff(&geglu(&xs).unwrap(), &via_candle(geglu(&as_f64).unwrap())) < 1e-5);
    }
}
