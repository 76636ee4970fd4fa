//! 2-D convolution for training: the forward is [`crate::kernels::conv`]'s kernel. The input
//! gradient is a convolution too, of the output gradient with the weights transposed and flipped
//! (`padding k - 1 - p`; for strides above 1 the output gradient is first spread `stride` apart),
//! so it runs the same kernel. The weight gradient is, per tap, one product of the output
//! gradient with the padded input read through strides, as the forward reads it.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::matmul::{all_threads, matmul_into, View};
use super::{unpack, WeightedGrad, WithGrad};
use crate::kernels::conv::{conv_f32, ConvSpec, Geometry};
use crate::kernels::cpu_op::contiguous_f32;

/// `x` (b, c_in, h, w) convolved with `weight` (c_out, c_in, k, k) as stored, plus `bias` (c_out):
/// f32 on the CPU, with a backward for all three.
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, spec: ConvSpec) -> Result<Tensor> {
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    let op = WithGrad(TrainConv(spec));
    match bias {
        Some(bias) => x.apply_op3(&weight, &bias.contiguous()?, op),
        None => x.apply_op2(&weight, op),
    }
}

struct TrainConv(ConvSpec);

/// `weight` (c_out, c_in, k, k) as tap-major (k, k, c_out, c_in); `flip` instead gives the
/// input gradient's taps: (k, k, c_in, c_out) with the kernel rotated by 180 degrees.
fn taps_of(weight: &[f32], spec: ConvSpec, flip: bool) -> Vec<f32> {
    let (c_out, c_in, k) = (spec.out_channels, spec.in_channels, spec.kernel);
    let mut taps = vec![0f32; weight.len()];
    for o in 0..c_out {
        for i in 0..c_in {
            for ky in 0..k {
                for kx in 0..k {
                    let value = weight[((o * c_in + i) * k + ky) * k + kx];
                    let index = if flip {
                        (((k - 1 - ky) * k + (k - 1 - kx)) * c_in + i) * c_out + o
                    } else {
                        ((ky * k + kx) * c_out + o) * c_in + i
                    };
                    taps[index] = value;
                }
            }
        }
    }
    taps
}

impl TrainConv {
    fn check(&self, x_l: &Layout, w_l: &Layout) -> Result<(usize, usize, usize)> {
        let spec = self.0;
        let (batch, c_in, h, w) = x_l.shape().dims4()?;
        let expected = [spec.out_channels, spec.in_channels, spec.kernel, spec.kernel];
        if c_in != spec.in_channels || w_l.shape().dims() != expected {
            candle_core::bail!(
                "conv2d: input {:?} and weights {:?} for {spec:?}",
                x_l.shape(),
                w_l.shape()
            )
        }
        Ok((batch, h, w))
    }
}

impl WeightedGrad for TrainConv {
    const NAME: &'static str = "sdfix-train-conv2d";

    fn forward(
        &self,
        (x, x_l): (&CpuStorage, &Layout),
        (w, w_l): (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let spec = self.0;
        let (batch, h, w_px) = self.check(x_l, w_l)?;
        let x = contiguous_f32(x, x_l, "conv2d")?;
        let taps = taps_of(contiguous_f32(w, w_l, "conv2d")?, spec, false);
        let bias = bias.map(|(b, l)| contiguous_f32(b, l, "conv2d")).transpose()?;
        let g = Geometry::new(spec, h, w_px)?;
        let out = conv_f32(spec, &g, batch, x, &taps, bias);
        Ok((
            CpuStorage::F32(out),
            Shape::from((batch, spec.out_channels, g.out_h, g.out_w)),
        ))
    }

    fn backward(&self, x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Tensor, Tensor)> {
        let grad = grad.contiguous()?;
        // The input's gradient only when something upstream wants it (not for the noisy latents
        // entering conv_in).
        let dx = if x.track_op() {
            let (_, _, h, w_px) = x.dims4()?;
            Some(grad.apply_op2_no_bwd(
                w,
                &ConvInputGrad {
                    spec: self.0,
                    height: h,
                    width: w_px,
                },
            )?)
        } else {
            None
        };
        let packed = grad.apply_op2_no_bwd(x, &ConvWeightGrad(self.0))?;
        let spec = self.0;
        let [dw, db] = unpack(
            &packed,
            [
                &[spec.out_channels, spec.in_channels, spec.kernel, spec.kernel],
                &[spec.out_channels],
            ],
        )?;
        Ok((dx, dw, db))
    }
}

/// (grad (b, c_out, oh, ow), weight) -> the input's gradient (b, c_in, height, width): the
/// convolution of `grad`, spread `stride` apart and padded by `k - 1 - p`, with the flipped,
/// transposed weights.
struct ConvInputGrad {
    spec: ConvSpec,
    height: usize,
    width: usize,
}

impl CustomOp2 for ConvInputGrad {
    fn name(&self) -> &'static str {
        "sdfix-train-conv2d-input-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let spec = self.spec;
        let (batch, c_out, oh, ow) = l1.shape().dims4()?;
        let grad = contiguous_f32(s1, l1, "conv2d backward")?;
        let taps = taps_of(contiguous_f32(s2, l2, "conv2d backward")?, spec, true);
        let k = spec.kernel;
        if spec.padding >= k || c_out != spec.out_channels {
            candle_core::bail!(
                "conv2d backward: unsupported {spec:?} for a gradient of {:?}",
                l1.shape()
            )
        }
        let reach = k - 1 - spec.padding;
        let transposed = |padding| ConvSpec {
            in_channels: spec.out_channels,
            out_channels: spec.in_channels,
            kernel: k,
            padding,
            stride: 1,
        };
        let out = if spec.stride == 1 {
            let t = transposed(reach);
            let g = Geometry::new(t, oh, ow)?;
            if (g.out_h, g.out_w) != (self.height, self.width) {
                candle_core::bail!(
                    "conv2d backward: {oh}x{ow} gradient does not map back to {}x{}",
                    self.height,
                    self.width
                )
            }
            conv_f32(t, &g, batch, grad, &taps, None)
        } else {
            // The gradient spread `stride` apart at offset `reach`, in a (h + k - 1, w + k - 1)
            // zero plane: a valid convolution of it gives the input's (h, w).
            let (hd, wd) = (self.height + k - 1, self.width + k - 1);
            let s = spec.stride;
            if reach + s * (oh.max(1) - 1) >= hd || reach + s * (ow.max(1) - 1) >= wd {
                candle_core::bail!(
                    "conv2d backward: {oh}x{ow} gradient does not fit {}x{}",
                    self.height,
                    self.width
                )
            }
            let mut spread = vec![0f32; batch * c_out * hd * wd];
            spread
                .par_chunks_mut(hd * wd)
                .zip(grad.par_chunks(oh * ow))
                .for_each(|(dst, src)| {
                    for (i, row) in src.chunks(ow).enumerate() {
                        let base = (reach + s * i) * wd + reach;
                        for (j, &v) in row.iter().enumerate() {
                            dst[base + s * j] = v;
                        }
                    }
                });
            let t = transposed(0);
            let g = Geometry::new(t, hd, wd)?;
            conv_f32(t, &g, batch, &spread, &taps, None)
        };
        Ok((
            CpuStorage::F32(out),
            Shape::from((batch, spec.in_channels, self.height, self.width)),
        ))
    }
}

/// (grad (b, c_out, oh, ow), x (b, c_in, h, w)) -> packed [dW (c_out, c_in, k, k) | db (c_out)].
struct ConvWeightGrad(ConvSpec);

impl CustomOp2 for ConvWeightGrad {
    fn name(&self) -> &'static str {
        "sdfix-train-conv2d-weight-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let spec = self.0;
        let (batch, c_out, oh, ow) = l1.shape().dims4()?;
        let (_, c_in, h, w) = l2.shape().dims4()?;
        let grad = contiguous_f32(s1, l1, "conv2d backward")?;
        let x = contiguous_f32(s2, l2, "conv2d backward")?;
        let g = Geometry::new(spec, h, w)?;
        if (g.out_h, g.out_w) != (oh, ow) || c_in != spec.in_channels || c_out != spec.out_channels {
            candle_core::bail!(
                "conv2d backward: gradient {:?} for input {:?}, {spec:?}",
                l1.shape(),
                l2.shape()
            )
        }
        let (k, s, wp, channel_len) = (spec.kernel, spec.stride, g.padded_w, g.channel_len);
        // The padded input, read as the forward reads it.
        let len = batch * c_in * channel_len;
        let mut padded: Vec<f32> = Vec::with_capacity(len);
        for (src, dst) in x
            .chunks(c_in * h * w)
            .zip(padded.spare_capacity_mut()[..len].chunks_mut(c_in * channel_len))
        {
            g.pad(src, dst);
        }
        // SAFETY: `pad` wrote all channel_len elements of each of the batch * c_in channels.
        unsafe { padded.set_len(len) };
        // The gradient on the forward's output grid: rows wp wide, zero in the dropped columns.
        let columns = oh * wp;
        let mut wide = vec![0f32; batch * c_out * columns];
        wide.par_chunks_mut(columns)
            .zip(grad.par_chunks(oh * ow))
            .for_each(|(dst, src)| {
                for (y, row) in src.chunks(ow).enumerate() {
                    dst[y * wp..y * wp + ow].copy_from_slice(row);
                }
            });
        let taps = k * k;
        let tap_len = c_out * c_in;
        let mut tap_grads = vec![0f32; taps * tap_len];
        let threads = rayon::current_num_threads();
        let (tap_parallel, parallelism) = if taps >= threads {
            (true, gemm::Parallelism::None)
        } else {
            (false, all_threads())
        };
        let run_tap = |(tap, dst): (usize, &mut [f32])| -> Result<()> {
            let (ky, kx) = (tap / k, tap % k);
            for b in 0..batch {
                // dW[tap] (c_out, c_in) += wide_b (c_out, columns) @ P_b (columns, c_in), where
                // P_b[j, i] = padded_b[i * channel_len + ky * wp + kx + s * j].
                matmul_into(
                    dst,
                    b > 0,
                    View::new(&wide, b * c_out * columns, (c_out, columns), (columns, 1)),
                    View::new(
                        &padded,
                        b * c_in * channel_len + ky * wp + kx,
                        (columns, c_in),
                        (s, channel_len),
                    ),
                    parallelism,
                )?;
            }
            Ok(())
        };
        if tap_parallel {
            tap_grads.par_chunks_mut(tap_len).enumerate().try_for_each(run_tap)?;
        } else {
            tap_grads.chunks_mut(tap_len).enumerate().try_for_each(run_tap)?;
        }
        let mut packed = vec![0f32; taps * tap_len + c_out];
        for tap in 0..taps {
            for o in 0..c_out {
                for i in 0..c_in {
                    packed[(o * c_in + i) * taps + tap] = tap_grads[(tap * c_out + o) * c_in + i];
                }
            }
        }
        let plane = oh * ow;
        for (c, d) in packed[taps * tap_len..].iter_mut().enumerate() {
            let mut sum = 0f64;
            for b in 0..batch {
                sum += grad[(b * c_out + c) * plane..][..plane]
                    .iter()
                    .map(|&v| v as f64)
                    .sum::<f64>();
            }
            *d = sum as f32;
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
    fn conv2d_gradients_match_candles() {
        for &(b, c_in, c_out, h, w, k, p, s) in &[
            (2, 4, 8, 9, 7, 3, 1, 1),
            (1, 3, 5, 8, 8, 3, 1, 2),
            (2, 6, 4, 9, 11, 3, 0, 2),
            (2, 8, 16, 5, 6, 1, 0, 1),
            (3, 5, 3, 4, 4, 3, 1, 1),
            (1, 2, 3, 7, 9, 3, 1, 2),
        ] {
            let spec = ConvSpec {
                in_channels: c_in,
                out_channels: c_out,
                kernel: k,
                padding: p,
                stride: s,
            };
            let inputs = [randn(&[b, c_in, h, w]), randn(&[c_out, c_in, k, k]), randn(&[c_out])];
            let label = format!("conv {b} {c_in} {c_out} {h} {w} {k} {p} {s}");
            compare(
                &inputs,
                |t| conv2d(&t[0], &t[1], Some(&t[2]), spec),
                |t| {
                    t[0].conv2d(&t[1], p, s, 1, 1)?
                        .broadcast_add(&t[2].reshape((1, c_out, 1, 1))?)
                },
                1e-5,
                &label,
            );
            compare(
                &inputs[..2],
                |t| conv2d(&t[0], &t[1], None, spec),
                |t| t[0].conv2d(&t[1], p, s, 1, 1),
                1e-5,
                &format!("{label} without bias"),
            );
        }
    }
}
