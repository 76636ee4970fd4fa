//! Layer normalisation for training: over the last dimension, the backward recomputing each
//! row's statistics (f64 sums) rather than keeping them, as [`super::group_norm`] does.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::unpack;
use crate::kernels::cpu_op::contiguous_f32;

/// `xs` (..., d) normalised over its last dimension, times `weight` (d) plus `bias` (d): f32 on
/// the CPU, with a backward for all three.
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    xs.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, TrainLayerNorm { eps })
}

#[derive(Clone, Copy)]
struct TrainLayerNorm {
    eps: f64,
}

/// A row's mean and 1 / sqrt(var + eps), in f64.
fn row_stats(row: &[f32], eps: f64) -> (f64, f64) {
    let n = row.len() as f64;
    let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Rows per parallel task in the layer norm passes.
const LAYER_NORM_ROWS: usize = 64;

impl CustomOp3 for TrainLayerNorm {
    fn name(&self) -> &'static str {
        "sdfix-train-layer-norm"
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
        let x = contiguous_f32(s1, l1, "layer norm")?;
        let weight = contiguous_f32(s2, l2, "layer norm")?;
        let bias = contiguous_f32(s3, l3, "layer norm")?;
        let d = l1.shape().dims().last().copied().unwrap_or(0);
        if weight.len() != d || bias.len() != d || d == 0 {
            candle_core::bail!(
                "layer norm: input {:?}, {} weights, {} biases",
                l1.shape(),
                weight.len(),
                bias.len()
            )
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d * LAYER_NORM_ROWS)
            .zip(x.par_chunks(d * LAYER_NORM_ROWS))
            .for_each(|(out, x)| {
                for (out, row) in out.chunks_mut(d).zip(x.chunks(d)) {
                    let (mean, rstd) = row_stats(row, self.eps);
                    for (((o, &v), &w), &b) in out.iter_mut().zip(row).zip(weight).zip(bias) {
                        *o = ((v as f64 - mean) * rstd) as f32 * w + b;
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let packed = xs.apply_op3_no_bwd(&grad.contiguous()?, weight, &LayerNormBackward(*self))?;
        let d = bias.elem_count();
        let [dx, dw, db] = unpack(&packed, [xs.dims(), &[d], &[d]])?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// (x (..., d), grad, weight) -> packed [dx | dweight (d) | dbias (d)].
struct LayerNormBackward(TrainLayerNorm);

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "sdfix-train-layer-norm-backward"
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
        let x = contiguous_f32(s1, l1, "layer norm backward")?;
        let grad = contiguous_f32(s2, l2, "layer norm backward")?;
        let weight = contiguous_f32(s3, l3, "layer norm backward")?;
        let d = weight.len();
        if d == 0 || grad.len() != x.len() || !x.len().is_multiple_of(d) {
            candle_core::bail!("layer norm backward: input {:?}, {d} weights", l1.shape())
        }
        let mut dx = vec![0f32; x.len()];
        let chunk = d * LAYER_NORM_ROWS;
        let mut partial = vec![0f64; x.len().div_ceil(chunk) * 2 * d];
        dx.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .zip(grad.par_chunks(chunk))
            .zip(partial.par_chunks_mut(2 * d))
            .for_each(|(((dx, x), grad), partial)| {
                let (dweight, dbias) = partial.split_at_mut(d);
                for ((dx, row), grad) in dx.chunks_mut(d).zip(x.chunks(d)).zip(grad.chunks(d)) {
                    let (mean, rstd) = row_stats(row, self.0.eps);
                    let (mut sum_g, mut sum_g_xhat) = (0f64, 0f64);
                    for i in 0..d {
                        let xhat = (row[i] as f64 - mean) * rstd;
                        let g = grad[i] as f64;
                        dweight[i] += g * xhat;
                        dbias[i] += g;
                        let gw = g * weight[i] as f64;
                        sum_g += gw;
                        sum_g_xhat += gw * xhat;
                    }
                    let (mean_g, mean_g_xhat) = (sum_g / d as f64, sum_g_xhat / d as f64);
                    for i in 0..d {
                        let xhat = (row[i] as f64 - mean) * rstd;
                        let gw = grad[i] as f64 * weight[i] as f64;
                        dx[i] = (rstd * (gw - mean_g - xhat * mean_g_xhat)) as f32;
                    }
                }
            });
        let mut sums = vec![0f64; 2 * d];
        for part in partial.chunks(2 * d) {
            for (s, p) in sums.iter_mut().zip(part) {
                *s += p;
            }
        }
        dx.extend(sums.iter().map(|&s| s as f32));
        let len = dx.len();
        Ok((CpuStorage::F32(dx), Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::grad::testing::{compare, randn};

    #[test]
    fn layer_norm_gradients_match_candles() {
        for &(rows, d) in &[(3, 8), (130, 32), (1, 5)] {
            let inputs = [randn(&[2, rows, d]).affine(2.0, 1.0).unwrap(), randn(&[d]), randn(&[d])];
            compare(
                &inputs,
                |t| layer_norm(&t[0], &t[1], &t[2], 1e-5),
                |t| candle_nn::ops::layer_norm_slow(&t[0], &t[1], &t[2], 1e-5),
                2e-5,
                &format!("layer norm {rows} {d}"),
            );
        }
    }
}
