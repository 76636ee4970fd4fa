//! Linear layers' product `x @ W + b` on the CPU in f32, as a candle custom op.
//!
//! We split the product ourselves: each of the pool's threads runs one single-threaded matrix
//! product on its share of the rows (or of the output features, when there are fewer rows than
//! features, so each thread packs only its part of the weights). On the UNet's large products the
//! gemm crate's own threading gave 1.55x on two cores (`scripts/gemm_compare.sh`); one product per
//! thread keeps the threads independent. The bias is added in the same pass.

use candle_core::{Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::kernels::cpu_op::{apply_weighted, transpose_2d, SharedOut, WeightedKernel};

/// `weight` (out, in), f32 on the CPU, transposed to a contiguous (in, out): the layout
/// [`linear_f32`] reads, with unit stride along the output features, so the gemm crate need not
/// repack it per call. Done once, at load.
pub fn transposed_weight(weight: &Tensor) -> Result<Tensor> {
    transpose_2d(&weight.contiguous()?)
}

/// `x` (..., in), f32 on the CPU (made contiguous), times `weight_t` (in, out) from
/// [`transposed_weight`], plus `bias` (out, contiguous) when given: (..., out).
pub fn linear_f32(x: &Tensor, weight_t: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    apply_weighted(CpuLinear, x, weight_t, bias)
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
    use crate::kernels::cpu_op::max_abs_diff;
    use candle_core::{Device, Module};

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
            let weight_t = transposed_weight(&weight).unwrap();
            for bias in [Some(bias), None] {
                let reference = candle_nn::Linear::new(weight.clone(), bias.clone());
                let expected = reference.forward(&xs).unwrap();
                let got = linear_f32(&xs, &weight_t, bias.as_ref()).unwrap();
                assert_eq!(got.dims(), expected.dims());
                assert!(max_abs_diff(&got, &expected) < 1e-4, "{shape:?} {in_dim} {out_dim}");
            }
        }
    }
}
