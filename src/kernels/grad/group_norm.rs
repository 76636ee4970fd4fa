//! Group normalisation for training, optionally fused with SiLU: the forward is
//! [`crate::kernels::norm`]'s kernel; the backward recomputes each group's statistics (f64 sums)
//! rather than keeping them, and gives `dx = rstd (g - mean(g) - xhat mean(g xhat))`,
//! `g = dy * gamma`, with the scale's and shift's gradients, in one pass per group.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::unpack;
use crate::kernels::cpu_math;
use crate::kernels::cpu_op::contiguous_f32;
use crate::kernels::norm::CpuGroupNorm;

/// `xs` (b, c, ...) normalised over each of `groups` groups of channels, times `weight` (c) plus
/// `bias` (c), then SiLU when `silu`: f32 on the CPU, with a backward for all three.
pub fn group_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, groups: usize, eps: f64, silu: bool) -> Result<Tensor> {
    xs.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        TrainGroupNorm { groups, eps, silu },
    )
}

#[derive(Clone, Copy)]
struct TrainGroupNorm {
    groups: usize,
    eps: f64,
    silu: bool,
}

impl CustomOp3 for TrainGroupNorm {
    fn name(&self) -> &'static str {
        "sdfix-train-group-norm"
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
        let forward = CpuGroupNorm {
            groups: self.groups,
            eps: self.eps,
            silu: self.silu,
        };
        forward.cpu_fwd(s1, l1, s2, l2, s3, l3)
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let params = Tensor::cat(&[weight, bias], 0)?;
        let packed = xs.apply_op3_no_bwd(&grad.contiguous()?, &params, &GroupNormBackward(*self))?;
        let channels = weight.elem_count();
        let [dx, dw, db] = unpack(&packed, [xs.dims(), &[channels], &[channels]])?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// d/dy of silu(y) = y sigmoid(y).
fn silu_derivative(y: f32) -> f32 {
    let s = 1.0 / (1.0 + cpu_math::exp(-y));
    s * (1.0 + y * (1.0 - s))
}

/// (x (b, c, ...), grad, [weight | bias]) -> packed [dx | dweight (c) | dbias (c)].
struct GroupNormBackward(TrainGroupNorm);

impl CustomOp3 for GroupNormBackward {
    fn name(&self) -> &'static str {
        "sdfix-train-group-norm-backward"
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
        let TrainGroupNorm { groups, eps, silu } = self.0;
        let x = contiguous_f32(s1, l1, "group norm backward")?;
        let grad = contiguous_f32(s2, l2, "group norm backward")?;
        let params = contiguous_f32(s3, l3, "group norm backward")?;
        let dims = l1.shape().dims();
        let (batch, channels) = (dims[0], dims[1]);
        if grad.len() != x.len() || params.len() != 2 * channels || groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!(
                "group norm backward: shapes {:?}, {} params, {groups} groups",
                dims,
                params.len()
            )
        }
        let (weight, bias) = params.split_at(channels);
        let positions: usize = dims[2..].iter().product();
        let per_group = channels / groups;
        let group_len = per_group * positions;
        // dx is written through its spare capacity (no zero fill: every element is stored by the
        // first pass below), its length set once all of it is.
        let mut packed: Vec<f32> = Vec::with_capacity(x.len() + 2 * channels);
        // Per (sample, group): [dweight | dbias] of its channels, summed over samples after.
        let mut partial = vec![0f64; batch * groups * 2 * per_group];
        if group_len > 0 {
            packed.spare_capacity_mut()[..x.len()]
                .par_chunks_mut(group_len)
                .zip(x.par_chunks(group_len))
                .zip(grad.par_chunks(group_len))
                .zip(partial.par_chunks_mut(2 * per_group))
                .enumerate()
                .for_each(|(index, (((dx, x), grad), partial))| {
                    let n = group_len as f64;
                    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
                    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
                    let rstd = 1.0 / (var + eps).sqrt();
                    let first = (index % groups) * per_group;
                    let (mut sum_g, mut sum_g_xhat) = (0f64, 0f64);
                    let (dweight, dbias) = partial.split_at_mut(per_group);
                    for c in 0..per_group {
                        let (gamma, beta) = (weight[first + c], bias[first + c]);
                        let range = c * positions..(c + 1) * positions;
                        let (mut dw, mut db) = (0f64, 0f64);
                        for ((d, &xv), &gv) in dx[range.clone()].iter_mut().zip(&x[range.clone()]).zip(&grad[range]) {
                            let xhat = ((xv as f64 - mean) * rstd) as f32;
                            let dy = if silu {
                                gv * silu_derivative(gamma * xhat + beta)
                            } else {
                                gv
                            };
                            dw += (dy * xhat) as f64;
                            db += dy as f64;
                            let g = dy * gamma;
                            sum_g += g as f64;
                            sum_g_xhat += (g * xhat) as f64;
                            d.write(g);
                        }
                        dweight[c] = dw;
                        dbias[c] = db;
                    }
                    let (mean_g, mean_g_xhat) = (sum_g / n, sum_g_xhat / n);
                    for (d, &xv) in dx.iter_mut().zip(x) {
                        let xhat = (xv as f64 - mean) * rstd;
                        // SAFETY: `d` is one of this task's group_len elements, each written by the
                        // first pass (its channels' ranges cover the chunk); f32 has no invalid values.
                        let g = unsafe { d.assume_init() } as f64;
                        d.write((rstd * (g - mean_g - xhat * mean_g_xhat)) as f32);
                    }
                });
        }
        // SAFETY: the capacity is at least x.len(), and elements 0..x.len() are initialised: x is
        // the contiguous (b, c, ...) input, so x.len() is batch * groups * group_len and the
        // group_len chunks above are the batch * groups tasks (as many as `partial`'s chunks, so
        // the zip drops none), and each task's first pass wrote its channels' ranges
        // c * positions..(c + 1) * positions, all of its group_len elements. With group_len 0,
        // x.len() is 0 and nothing needs writing.
        unsafe { packed.set_len(x.len()) };
        let mut sums = vec![0f64; 2 * channels];
        for (index, part) in partial.chunks(2 * per_group).enumerate() {
            let first = (index % groups) * per_group;
            for c in 0..per_group {
                sums[first + c] += part[c];
                sums[channels + first + c] += part[per_group + c];
            }
        }
        packed.extend(sums.iter().map(|&s| s as f32));
        let len = packed.len();
        Ok((CpuStorage::F32(packed), Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::grad::testing::{compare, randn};

    /// The reference group norm from candle ops (f64 here).
    fn group_norm_reference(t: &[Tensor], groups: usize, eps: f64, silu: bool) -> Result<Tensor> {
        let dims = t[0].dims().to_vec();
        let grouped = t[0].reshape((dims[0], groups, ()))?;
        let mean = grouped.mean_keepdim(2)?;
        let centred = grouped.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(2)?;
        let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?.reshape(dims.as_slice())?;
        let mut shape = vec![1, dims[1]];
        shape.extend(std::iter::repeat_n(1, dims.len() - 2));
        let ys = normed
            .broadcast_mul(&t[1].reshape(shape.as_slice())?)?
            .broadcast_add(&t[2].reshape(shape.as_slice())?)?;
        if silu {
            ys.silu()
        } else {
            Ok(ys)
        }
    }

    #[test]
    fn group_norm_gradients_match_candles() {
        for &(b, c, h, w, g) in &[(2, 8, 5, 7, 4), (1, 32, 6, 6, 32), (3, 6, 2, 1, 3), (2, 64, 4, 3, 32)] {
            for silu in [false, true] {
                let x = randn(&[b, c, h, w]).affine(3.0, 2.0).unwrap();
                let inputs = [x, randn(&[c]).affine(0.5, 1.0).unwrap(), randn(&[c])];
                compare(
                    &inputs,
                    |t| group_norm(&t[0], &t[1], &t[2], g, 1e-5, silu),
                    |t| group_norm_reference(t, g, 1e-5, silu),
                    2e-5,
                    &format!("group norm {b} {c} {h} {w} {g} silu={silu}"),
                );
            }
        }
    }
}
