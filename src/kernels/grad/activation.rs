//! The exact (erf) GELU and diffusers' GEGLU for training, with their derivatives.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::kernels::cpu_math;
use crate::kernels::cpu_op::contiguous_f32;

/// d/dx of the exact GELU: Phi(x) + x phi(x).
fn gelu_erf_derivative(x: f32) -> f32 {
    let cdf = 0.5 * (1.0 + cpu_math::erf(x * std::f32::consts::FRAC_1_SQRT_2));
    let pdf = cpu_math::exp(-0.5 * x * x) * 0.398_942_3;
    cdf + x * pdf
}

/// The exact (erf) GELU of `xs`, f32 on the CPU, with a backward.
pub fn gelu_erf(xs: &Tensor) -> Result<Tensor> {
    xs.contiguous()?.apply_op1(TrainActivation::Gelu)
}

/// diffusers' GEGLU of `projected` (..., 2f) -> (..., f): `value * gelu_erf(gate)` with value the
/// first half of the last dimension; f32 on the CPU, with a backward.
pub fn geglu(projected: &Tensor) -> Result<Tensor> {
    projected.contiguous()?.apply_op1(TrainActivation::Geglu)
}

#[derive(Clone, Copy)]
enum TrainActivation {
    Gelu,
    Geglu,
}

impl candle_core::CustomOp1 for TrainActivation {
    fn name(&self) -> &'static str {
        "sdfix-train-activation"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let xs = contiguous_f32(storage, layout, "activation")?;
        match self {
            Self::Gelu => Ok((
                CpuStorage::F32(xs.par_iter().map(|&x| cpu_math::gelu_erf(x)).collect()),
                layout.shape().clone(),
            )),
            Self::Geglu => {
                let width = layout.shape().dims().last().copied().unwrap_or(0);
                if width % 2 != 0 {
                    candle_core::bail!("geglu: odd last dimension {width}")
                }
                let half = width / 2;
                let mut out = vec![0f32; xs.len() / 2];
                if half > 0 {
                    out.par_chunks_mut(half)
                        .zip(xs.par_chunks(width))
                        .for_each(|(dst, row)| {
                            let (value, gate) = row.split_at(half);
                            for ((d, &v), &g) in dst.iter_mut().zip(value).zip(gate) {
                                *d = v * cpu_math::gelu_erf(g);
                            }
                        });
                }
                let mut shape = layout.shape().dims().to_vec();
                if let Some(last) = shape.last_mut() {
                    *last = half;
                }
                Ok((CpuStorage::F32(out), Shape::from(shape)))
            }
        }
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            grad.contiguous()?.apply_op2_no_bwd(arg, &ActivationBackward(*self))?,
        ))
    }
}

/// (grad, input) -> the input's gradient.
struct ActivationBackward(TrainActivation);

impl CustomOp2 for ActivationBackward {
    fn name(&self) -> &'static str {
        "sdfix-train-activation-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let grad = contiguous_f32(s1, l1, "activation backward")?;
        let xs = contiguous_f32(s2, l2, "activation backward")?;
        let out = match self.0 {
            TrainActivation::Gelu => {
                if grad.len() != xs.len() {
                    candle_core::bail!("gelu backward: gradient {:?} for input {:?}", l1.shape(), l2.shape())
                }
                grad.par_iter()
                    .zip(xs)
                    .map(|(&g, &x)| g * gelu_erf_derivative(x))
                    .collect()
            }
            TrainActivation::Geglu => {
                let width = l2.shape().dims().last().copied().unwrap_or(0);
                let half = width / 2;
                if grad.len() * 2 != xs.len() {
                    candle_core::bail!("geglu backward: gradient {:?} for input {:?}", l1.shape(), l2.shape())
                }
                let mut out = vec![0f32; xs.len()];
                if half > 0 {
                    out.par_chunks_mut(width)
                        .zip(xs.par_chunks(width))
                        .zip(grad.par_chunks(half))
                        .for_each(|((dst, row), grad)| {
                            let (value, gate) = row.split_at(half);
                            let (d_value, d_gate) = dst.split_at_mut(half);
                            for i in 0..half {
                                d_value[i] = grad[i] * cpu_math::gelu_erf(gate[i]);
                                d_gate[i] = grad[i] * value[i] * gelu_erf_derivative(gate[i]);
                            }
                        });
                }
                out
            }
        };
        Ok((CpuStorage::F32(out), l2.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::grad::testing::{compare, randn};

    #[test]
    fn gelu_and_geglu_gradients_match_candles() {
        let inputs = [randn(&[3, 5, 12]).affine(2.0, 0.0).unwrap()];
        compare(&inputs, |t| gelu_erf(&t[0]), |t| t[0].gelu_erf(), 2e-5, "gelu");
        compare(
            &inputs,
            |t| geglu(&t[0]),
            |t| {
                let halves = t[0].chunk(2, candle_core::D::Minus1)?;
                &halves[0] * halves[1].gelu_erf()?
            },
            2e-5,
            "geglu",
        );
    }
}
