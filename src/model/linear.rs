//! Linear layers (`x @ W^T + b`) for the UNet's transformers, the time embedding and CLIP.
//!
//! On the CPU in f32 we split the product ourselves: each of the pool's threads runs one
//! single-threaded matrix product on its share of the rows (or of the output features, when
//! there are fewer rows than features, so each thread packs only its part of the weights). On the
//! UNet's large products the gemm crate's own threading gave 1.55x on two cores
//! (`scripts/gemm_compare.sh`); one product per thread keeps the threads independent. The bias is
//! added in the same pass. Elsewhere: candle-nn's Linear.

use candle_core::{DType, Device, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use crate::model::cpu_op::{apply_weighted, transpose_2d, SharedOut, WeightedKernel};
use crate::model::op_profile;

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
        if weight.dtype() == DType::F32 && matches!(weight.device(), Device::Cpu) {
            Ok(Self::Cpu {
                weight_t: transpose_2d(&weight.contiguous()?)?,
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
        op_profile::time_detailed("linear", shape, || match self {
            Self::Cpu { weight_t, bias } => apply_weighted(CpuLinear, xs, weight_t, bias.as_ref()),
            Self::Candle(layer) => layer.forward(xs),
        })
    }
}

struct CpuLinear;

impl WeightedKernel for CpuLinear {
    const NAME: &'static str = "sdfix-linear";

    fn run(
        &self,
        (x, x_l): (&[f32], &Layout),
        (w, w_l): (&[f32], &Layout),
        bias: Option<&[f32]>,
    ) -> Result<(Vec<f32>, Shape)> {
        let (in_dim, out_dim) = w_l.shape().dims2()?;
        let dims = x_l.shape().dims();
        if dims.last() != Some(&in_dim) {
            candle_core::bail!("linear: input {:?} does not end in {in_dim}", dims)
        }
        let rows = x.len() / in_dim.max(1);
        let out = matmul(x, w, bias, rows, in_dim, out_dim);
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("checked non-empty") = out_dim;
        Ok((out, Shape::from(shape)))
    }
}

/// `x (rows, k) @ w (k, n) (+ bias)`, split over the rayon pool.
fn matmul(x: &[f32], w: &[f32], bias: Option<&[f32]>, rows: usize, k: usize, n: usize) -> Vec<f32> {
    if rows == 0 || n == 0 || k == 0 {
        return bias.map_or_else(
            || vec![0f32; rows * n],
            |b| b.iter().copied().cycle().take(rows * n).collect(),
        );
    }
    // Not zeroed: each task's product stores its whole block (read_dst = false).
    let mut out: Vec<f32> = Vec::with_capacity(rows * n);
    let threads = rayon::current_num_threads().max(1);
    // Split the dimension whose operand is cheaper to pack twice.
    let split_rows = rows >= n;
    let (len, min_chunk) = if split_rows { (rows, 16) } else { (n, 64) };
    let chunks = threads.min(len.div_ceil(min_chunk)).max(1);
    let chunk = len.div_ceil(chunks);
    let shared = SharedOut::new_uninit(&mut out);
    (0..chunks).into_par_iter().for_each(|index| {
        let start = index * chunk;
        let end = (start + chunk).min(len);
        if start >= end {
            return;
        }
        let (r0, r1, c0, c1) = if split_rows {
            (start, end, 0, n)
        } else {
            (0, rows, start, end)
        };
        // SAFETY: lhs rows r0..r1 of x (row stride k); rhs element (kk, j) = w[kk * n + c0 + j];
        // dst block rows r0..r1, columns c0..c1 of out (row stride n), written by this task only.
        unsafe {
            gemm::gemm(
                r1 - r0,
                c1 - c0,
                k,
                shared.ptr().add(r0 * n + c0),
                1,
                n as isize,
                false,
                x.as_ptr().add(r0 * k),
                1,
                k as isize,
                w.as_ptr().add(c0),
                1,
                n as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        if let Some(bias) = bias {
            for r in r0..r1 {
                // SAFETY: row r, columns c0..c1 belong to this task.
                let row = unsafe { std::slice::from_raw_parts_mut(shared.ptr().add(r * n + c0), c1 - c0) };
                for (v, b) in row.iter_mut().zip(&bias[c0..c1]) {
                    *v += b;
                }
            }
        }
    });
    // SAFETY: the chunks cover all rows (or all columns) of the (rows, n) output.
    unsafe { out.set_len(rows * n) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cpu_op::max_abs_diff;

    #[test]
    fn matches_candle_nn_for_tall_wide_and_batched_inputs() {
        let dev = Device::Cpu;
        for &(shape, in_dim, out_dim) in &[
            (&[7usize, 5][..], 5usize, 3usize),
            (&[2, 77, 32][..], 32, 96),
            (&[2, 300, 16][..], 16, 8),
            (&[1, 1, 4][..], 4, 1000),
        ] {
            let xs = Tensor::randn(0f32, 1., shape, &dev).unwrap();
            let weight = Tensor::randn(0f32, 1., (out_dim, in_dim), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1., out_dim, &dev).unwrap();
            for bias in [Some(bias), None] {
                let reference = candle_nn::Linear::new(weight.clone(), bias.clone());
                let ours = Linear::new(weight.clone(), bias).unwrap();
                assert!(matches!(ours, Linear::Cpu { .. }));
                let expected = reference.forward(&xs).unwrap();
                let got = ours.forward(&xs).unwrap();
                assert_eq!(got.dims(), expected.dims());
                assert!(max_abs_diff(&got, &expected) < 1e-4, "{shape:?} {in_dim} {out_dim}");
            }
        }
    }
}
