//! Linear layers for training: `x @ W^T + b` forward, and (dx, dW, db) from the output's
//! gradient in one op: two matrix products and a column sum.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::matmul::{all_threads, matmul_into, View};
use super::{column_sums, unpack, WeightedGrad, WithGrad};
use crate::kernels::cpu_op::contiguous_f32;

/// `x (..., in) @ weight^T + bias`, `weight` (out, in) and `bias` (out) as stored: f32 on the
/// CPU, with a backward for all three.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (out_dim, in_dim) = weight.dims2()?;
    if dims.last() != Some(&in_dim) {
        candle_core::bail!("linear: input {dims:?} does not end in {in_dim}")
    }
    let rows = x.elem_count() / in_dim.max(1);
    let x2 = x.reshape((rows, in_dim))?.contiguous()?;
    let weight = weight.contiguous()?;
    let ys = match bias {
        Some(bias) => x2.apply_op3(&weight, &bias.contiguous()?, WithGrad(TrainLinear))?,
        None => x2.apply_op2(&weight, WithGrad(TrainLinear))?,
    };
    let mut shape = dims;
    *shape.last_mut().expect("checked non-empty") = out_dim;
    ys.reshape(shape)
}

struct TrainLinear;

impl WeightedGrad for TrainLinear {
    const NAME: &'static str = "sdfix-train-linear";

    fn forward(
        &self,
        (x, x_l): (&CpuStorage, &Layout),
        (w, w_l): (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, in_dim) = x_l.shape().dims2()?;
        let (out_dim, w_in) = w_l.shape().dims2()?;
        if w_in != in_dim {
            candle_core::bail!("linear: input width {in_dim}, weights ({out_dim}, {w_in})")
        }
        let x = contiguous_f32(x, x_l, "linear")?;
        let w = contiguous_f32(w, w_l, "linear")?;
        let mut out = vec![0f32; rows * out_dim];
        matmul_into(
            &mut out,
            false,
            View::new(x, 0, (rows, in_dim), (in_dim, 1)),
            View::new(w, 0, (in_dim, out_dim), (1, in_dim)),
            all_threads(),
        )?;
        if let Some((b, b_l)) = bias {
            let b = contiguous_f32(b, b_l, "linear")?;
            if b.len() != out_dim {
                candle_core::bail!("linear: {} biases for {out_dim} outputs", b.len())
            }
            out.par_chunks_mut(out_dim)
                .for_each(|row| row.iter_mut().zip(b).for_each(|(o, &b)| *o += b));
        }
        Ok((CpuStorage::F32(out), Shape::from((rows, out_dim))))
    }

    /// (dx, dW, db) for the output gradient `grad` (rows, out).
    fn backward(&self, x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Tensor, Tensor)> {
        let packed = grad.contiguous()?.apply_op3_no_bwd(x, w, &LinearBackward)?;
        let (rows, in_dim) = x.dims2()?;
        let (out_dim, _) = w.dims2()?;
        let [dx, dw, db] = unpack(&packed, [&[rows, in_dim], &[out_dim, in_dim], &[out_dim]])?;
        Ok((Some(dx), dw, db))
    }
}

/// (grad (rows, out), x (rows, in), w (out, in)) -> packed [dx (rows, in) | dW (out, in) | db (out)].
struct LinearBackward;

impl CustomOp3 for LinearBackward {
    fn name(&self) -> &'static str {
        "sdfix-train-linear-backward"
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
        let (rows, out_dim) = l1.shape().dims2()?;
        let (_, in_dim) = l2.shape().dims2()?;
        let grad = contiguous_f32(s1, l1, "linear backward")?;
        let x = contiguous_f32(s2, l2, "linear backward")?;
        let w = contiguous_f32(s3, l3, "linear backward")?;
        let mut packed = vec![0f32; rows * in_dim + out_dim * in_dim + out_dim];
        let (dx, rest) = packed.split_at_mut(rows * in_dim);
        let (dw, db) = rest.split_at_mut(out_dim * in_dim);
        // dx = grad @ W
        matmul_into(
            dx,
            false,
            View::new(grad, 0, (rows, out_dim), (out_dim, 1)),
            View::new(w, 0, (out_dim, in_dim), (in_dim, 1)),
            all_threads(),
        )?;
        // dW = grad^T @ x
        matmul_into(
            dw,
            false,
            View::new(grad, 0, (out_dim, rows), (1, out_dim)),
            View::new(x, 0, (rows, in_dim), (in_dim, 1)),
            all_threads(),
        )?;
        for (d, s) in db.iter_mut().zip(column_sums(grad, out_dim)) {
            *d = s as f32;
        }
        let len = packed.len();
        Ok((CpuStorage::F32(packed), Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::grad::testing::{compare, randn};

    #[test]
    fn linear_gradients_match_candles() {
        for &(lead, i, o) in &[(&[2usize, 5][..], 7, 3), (&[33][..], 64, 130), (&[1, 1][..], 4, 4)] {
            let mut x_shape = lead.to_vec();
            x_shape.push(i);
            let inputs = [randn(&x_shape), randn(&[o, i]), randn(&[o])];
            compare(
                &inputs,
                |t| linear(&t[0], &t[1], Some(&t[2])),
                |t| t[0].broadcast_matmul(&t[1].t()?)?.broadcast_add(&t[2]),
                1e-5,
                "linear",
            );
            compare(
                &inputs[..2],
                |t| linear(&t[0], &t[1], None),
                |t| t[0].broadcast_matmul(&t[1].t()?),
                1e-5,
                "linear without bias",
            );
        }
    }
}
