//! The training path's layers with a backward of our own, on the CPU in f32: convolution,
//! linear, group norm (optionally fused with SiLU), layer norm, attention, GELU and GEGLU, each a
//! candle custom op whose `bwd` runs one more custom op that computes every gradient of the layer
//! in one pass.
//!
//! Why: built from candle ops, a training step of the demo UNet spent 22% of its time in candle's
//! reductions over leading dimensions (the backward of every bias, and of every norm's scale and
//! shift, broadcast over batch and positions: an index division per element), 9% in its
//! transposed convolution (the convolution's input gradient, a dot product per output element),
//! and most of the rest in element-wise passes of the eight-op group norm (`perf` on
//! `sdfix finetune --model demo-flawed --data demo`). Here every gradient is matrix products
//! (the gemm crate) or one fused pass.
//!
//! - Convolution: the forward is [`crate::kernels::conv`]'s kernel. The input gradient is a
//!   convolution too, of the output gradient with the weights transposed and flipped
//!   (`padding k - 1 - p`; for strides above 1 the output gradient is first spread `stride`
//!   apart), so it runs the same kernel. The weight gradient is, per tap, one product of the
//!   output gradient with the padded input read through strides, as the forward reads it.
//! - Group and layer norm recompute their statistics in the backward (f64 sums) rather than
//!   keeping them, and give `dx = rstd (g - mean(g) - xhat mean(g xhat))`, `g = dy * gamma`.
//! - Attention runs one task per (sample, head) on the heads' columns in place, and recomputes
//!   the probabilities in the backward (the composite path kept (b, h, n, m) tensors per op).

use std::mem::MaybeUninit;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::kernels::conv::{conv_f32, ConvSpec, Geometry};
use crate::kernels::cpu_math;
use crate::kernels::cpu_op::contiguous_f32;
use crate::kernels::norm::CpuGroupNorm;

/// A read-only matrix inside a slice: element (i, j) at `offset + i * row_stride + j * col_stride`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    offset: usize,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> View<'a> {
    fn new(
        data: &'a [f32],
        offset: usize,
        (rows, cols): (usize, usize),
        (row_stride, col_stride): (usize, usize),
    ) -> Self {
        Self {
            data,
            offset,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    /// Whether every element lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || self.offset + (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride < self.data.len()
    }
}

/// `dst (m, n), row-major with row stride n` = (`accumulate` ? dst : 0) + `lhs (m, k) @ rhs (k, n)`.
fn matmul_into(dst: &mut [f32], accumulate: bool, lhs: View, rhs: View, parallelism: gemm::Parallelism) -> Result<()> {
    matmul_general(dst, accumulate, 1.0, lhs, rhs, parallelism)
}

/// `dst = scale * lhs @ rhs`.
fn matmul_scaled_into(dst: &mut [f32], scale: f32, lhs: View, rhs: View, parallelism: gemm::Parallelism) -> Result<()> {
    matmul_general(dst, false, scale, lhs, rhs, parallelism)
}

fn matmul_general(
    dst: &mut [f32],
    accumulate: bool,
    scale: f32,
    lhs: View,
    rhs: View,
    parallelism: gemm::Parallelism,
) -> Result<()> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if rhs.rows != k || dst.len() != m * n || !lhs.in_bounds() || !rhs.in_bounds() {
        candle_core::bail!(
            "matmul: ({m}, {k}) @ ({}, {n}) into {} elements, or a view out of bounds",
            rhs.rows,
            dst.len()
        )
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return Ok(());
    }
    // SAFETY: dst holds m * n elements (row stride n, column stride 1); lhs and rhs were checked
    // above to address only elements inside their slices; dst does not alias them (it is a
    // distinct &mut borrow).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr().add(lhs.offset),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr().add(rhs.offset),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

fn all_threads() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// The packed output of a backward op, split back into gradients of the given shapes.
fn unpack<const N: usize>(packed: &Tensor, shapes: [&[usize]; N]) -> Result<[Tensor; N]> {
    let mut start = 0;
    let mut out = Vec::with_capacity(N);
    for shape in shapes {
        let len: usize = shape.iter().product();
        out.push(packed.narrow(0, start, len)?.reshape(shape)?);
        start += len;
    }
    Ok(out.try_into().expect("one tensor per shape"))
}

/// Sums `values` (rows of `width`) over the rows, in f64.
fn column_sums(values: &[f32], width: usize) -> Vec<f64> {
    let mut sums = vec![0f64; width];
    for row in values.chunks(width) {
        for (s, &v) in sums.iter_mut().zip(row) {
            *s += v as f64;
        }
    }
    sums
}

// ---------------------------------------------------------------------------------------------
// Layers with a weight and an optional bias

/// A training op over an input, a weight and an optional bias (linear, convolution): the
/// forward on contiguous f32 storage, and every gradient from the output's.
trait WeightedGrad: Send + Sync + 'static {
    /// The op's name in candle and in errors.
    const NAME: &'static str;

    fn forward(
        &self,
        input: (&CpuStorage, &Layout),
        weight: (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)>;

    /// (d input, or None when nothing upstream wants it; d weight; d bias, dropped when the
    /// call had no bias).
    fn backward(&self, x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Tensor, Tensor)>;
}

/// A [`WeightedGrad`] as a candle op with a backward: two operands without a bias, three with
/// one (as [`crate::kernels::cpu_op`]'s wrapper does for the inference kernels).
struct WithGrad<K>(K);

impl<K: WeightedGrad> CustomOp2 for WithGrad<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.0.forward((s1, l1), (s2, l2), None)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.0.backward(x, w, grad)?;
        Ok((dx, Some(dw)))
    }
}

impl<K: WeightedGrad> CustomOp3 for WithGrad<K> {
    fn name(&self) -> &'static str {
        K::NAME
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
        self.0.forward((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = self.0.backward(x, w, grad)?;
        Ok((dx, Some(dw), Some(db)))
    }
}

// ---------------------------------------------------------------------------------------------
// Linear

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

// ---------------------------------------------------------------------------------------------
// Convolution

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

// ---------------------------------------------------------------------------------------------
// Group norm

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
        let mut dx: Vec<MaybeUninit<f32>> = Vec::with_capacity(x.len());
        // SAFETY: MaybeUninit needs no initialisation; every element is written below before
        // the buffer is read as f32.
        unsafe { dx.set_len(x.len()) };
        // Per (sample, group): [dweight | dbias] of its channels, summed over samples after.
        let mut partial = vec![0f64; batch * groups * 2 * per_group];
        if group_len > 0 {
            dx.par_chunks_mut(group_len)
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
                        // SAFETY: written in the first pass above.
                        let g = unsafe { d.assume_init() } as f64;
                        d.write((rstd * (g - mean_g - xhat * mean_g_xhat)) as f32);
                    }
                });
        }
        // SAFETY: every element was written by its group (x.len() is batch * groups * group_len).
        let mut packed: Vec<f32> = unsafe { std::mem::transmute::<Vec<MaybeUninit<f32>>, Vec<f32>>(dx) };
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

// ---------------------------------------------------------------------------------------------
// Layer norm

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

// ---------------------------------------------------------------------------------------------
// Attention

/// Multi-head attention of `query` (b, n, h*d) over `key`/`value` (b, m, h*d), plus an additive
/// `mask` (n, m) when given (CLIP's causal one; it gets no gradient): f32 on the CPU, with a
/// backward for the other three. Each (sample, head) pair is one task reading its
/// head's columns in place (no split into (b, h, n, d) copies); the probabilities are recomputed
/// in the backward rather than kept.
pub fn attention(query: &Tensor, key: &Tensor, value: &Tensor, heads: usize, mask: Option<&Tensor>) -> Result<Tensor> {
    let mask = match mask {
        Some(mask) => {
            let (n, m) = (query.dim(1)?, key.dim(1)?);
            if mask.dims() != [n, m] {
                candle_core::bail!("attention: a mask {:?} for {n} queries and {m} keys", mask.dims())
            }
            Some(Arc::new(
                mask.to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            ))
        }
        None => None,
    };
    query
        .contiguous()?
        .apply_op3(&key.contiguous()?, &value.contiguous()?, TrainAttention { heads, mask })
}

#[derive(Clone)]
struct TrainAttention {
    heads: usize,
    /// The additive (n, m) mask, row-major.
    mask: Option<Arc<Vec<f32>>>,
}

/// The sizes of one attention call: batch, queries, keys, heads, head width.
#[derive(Clone, Copy)]
struct AttentionDims {
    batch: usize,
    queries: usize,
    keys: usize,
    heads: usize,
    head_dim: usize,
}

impl AttentionDims {
    fn new(heads: usize, q: &Layout, k: &Layout, v: &Layout) -> Result<Self> {
        let (batch, queries, inner) = q.shape().dims3()?;
        let (kb, keys, k_inner) = k.shape().dims3()?;
        if heads == 0 || !inner.is_multiple_of(heads) || (kb, k_inner) != (batch, inner) || v.shape() != k.shape() {
            candle_core::bail!(
                "attention: query {:?}, key {:?}, value {:?}, {heads} heads",
                q.shape(),
                k.shape(),
                v.shape()
            )
        }
        Ok(Self {
            batch,
            queries,
            keys,
            heads,
            head_dim: inner / heads,
        })
    }

    fn inner(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Head `head` of sample `b` of a (b, rows, h*d) tensor: a (rows, d) view.
    fn head<'a>(&self, data: &'a [f32], rows: usize, task: usize) -> View<'a> {
        let (b, head) = (task / self.heads, task % self.heads);
        View::new(
            data,
            b * rows * self.inner() + head * self.head_dim,
            (rows, self.head_dim),
            (self.inner(), 1),
        )
    }

    /// The same head read transposed: a (d, rows) view.
    fn head_t<'a>(&self, data: &'a [f32], rows: usize, task: usize) -> View<'a> {
        let view = self.head(data, rows, task);
        View::new(data, view.offset, (self.head_dim, rows), (1, self.inner()))
    }

    /// One product per task when there are enough tasks for the threads, else threaded products.
    fn parallelism(&self) -> (bool, gemm::Parallelism) {
        if self.batch * self.heads >= rayon::current_num_threads() {
            (true, gemm::Parallelism::None)
        } else {
            (false, all_threads())
        }
    }

    /// Softmax(q k^T / sqrt(d) + mask) of task `task` into `probs` (n, m).
    fn probabilities(
        &self,
        q: &[f32],
        k: &[f32],
        mask: Option<&[f32]>,
        task: usize,
        probs: &mut [f32],
        parallelism: gemm::Parallelism,
    ) -> Result<()> {
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        matmul_scaled_into(
            probs,
            scale,
            self.head(q, self.queries, task),
            self.head_t(k, self.keys, task),
            parallelism,
        )?;
        if let Some(mask) = mask {
            probs.iter_mut().zip(mask).for_each(|(p, m)| *p += m);
        }
        // The vectorised softmax of the inference kernel, as one block per row.
        let rows = self.queries;
        let mut max = vec![f32::NEG_INFINITY; rows];
        let mut sum = vec![0f32; rows];
        let mut correction = vec![0f32; rows];
        cpu_math::online_softmax_rows(probs, self.keys, &mut max, &mut sum, &mut correction);
        for (row, &total) in probs.chunks_mut(self.keys).zip(&sum) {
            let inv = 1.0 / total;
            row.iter_mut().for_each(|v| *v *= inv);
        }
        Ok(())
    }

    /// Runs `f(task, chunk)` over the tasks, each with its own `chunk_len` slice of `out`.
    fn for_each_task(
        &self,
        out: &mut [f32],
        chunk_len: usize,
        f: impl Fn(usize, &mut [f32], gemm::Parallelism) -> Result<()> + Sync,
    ) -> Result<()> {
        let (task_parallel, parallelism) = self.parallelism();
        if chunk_len == 0 {
            return Ok(());
        }
        if task_parallel {
            out.par_chunks_mut(chunk_len)
                .enumerate()
                .try_for_each(|(task, chunk)| f(task, chunk, parallelism))
        } else {
            out.chunks_mut(chunk_len)
                .enumerate()
                .try_for_each(|(task, chunk)| f(task, chunk, parallelism))
        }
    }

    /// Per-task (rows, d) blocks, task-major, back into a (b, rows, h*d) layout appended to `dst`.
    fn gather_heads(&self, blocks: &[f32], rows: usize, dst: &mut Vec<f32>) {
        let (d, inner) = (self.head_dim, self.inner());
        let start = dst.len();
        dst.resize(start + self.batch * rows * inner, 0.0);
        dst[start..]
            .par_chunks_mut(rows * inner)
            .enumerate()
            .for_each(|(b, sample)| {
                for head in 0..self.heads {
                    let block = &blocks[(b * self.heads + head) * rows * d..][..rows * d];
                    for (r, src) in block.chunks(d).enumerate() {
                        sample[r * inner + head * d..][..d].copy_from_slice(src);
                    }
                }
            });
    }
}

impl CustomOp3 for TrainAttention {
    fn name(&self) -> &'static str {
        "sdfix-train-attention"
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
        let dims = AttentionDims::new(self.heads, l1, l2, l3)?;
        let q = contiguous_f32(s1, l1, "attention")?;
        let k = contiguous_f32(s2, l2, "attention")?;
        let v = contiguous_f32(s3, l3, "attention")?;
        let (n, m, d) = (dims.queries, dims.keys, dims.head_dim);
        let mut blocks = vec![0f32; dims.batch * dims.heads * n * d];
        dims.for_each_task(&mut blocks, n * d, |task, out, parallelism| {
            let mut probs = vec![0f32; n * m];
            dims.probabilities(
                q,
                k,
                self.mask.as_deref().map(|m| m.as_slice()),
                task,
                &mut probs,
                parallelism,
            )?;
            matmul_into(
                out,
                false,
                View::new(&probs, 0, (n, m), (m, 1)),
                dims.head(v, m, task),
                parallelism,
            )
        })?;
        let mut out = Vec::new();
        dims.gather_heads(&blocks, n, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let qkv = Tensor::cat(&[q.flatten_all()?, k.flatten_all()?, v.flatten_all()?], 0)?;
        let packed = grad.contiguous()?.apply_op2_no_bwd(
            &qkv,
            &AttentionBackward {
                heads: self.heads,
                mask: self.mask.clone(),
                q_shape: q.shape().clone(),
                kv_shape: k.shape().clone(),
            },
        )?;
        let [dq, dk, dv] = unpack(&packed, [q.dims(), k.dims(), v.dims()])?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// (grad (b, n, h*d), [q | k | v] flattened) -> packed [dq | dk | dv] in their own shapes:
/// `dV = P^T dO`, `dP = dO V^T`, `dS = P (dP - rowsum(dP P)) / sqrt(d)`, `dQ = dS K`,
/// `dK = dS^T Q`.
struct AttentionBackward {
    heads: usize,
    mask: Option<Arc<Vec<f32>>>,
    q_shape: Shape,
    kv_shape: Shape,
}

impl CustomOp2 for AttentionBackward {
    fn name(&self) -> &'static str {
        "sdfix-train-attention-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let q_layout = Layout::contiguous(self.q_shape.clone());
        let kv_layout = Layout::contiguous(self.kv_shape.clone());
        let dims = AttentionDims::new(self.heads, &q_layout, &kv_layout, &kv_layout)?;
        let grad = contiguous_f32(s1, l1, "attention backward")?;
        let qkv = contiguous_f32(s2, l2, "attention backward")?;
        let (q_len, kv_len) = (self.q_shape.elem_count(), self.kv_shape.elem_count());
        if grad.len() != q_len || qkv.len() != q_len + 2 * kv_len {
            candle_core::bail!(
                "attention backward: gradient {:?} for query {:?}",
                l1.shape(),
                self.q_shape
            )
        }
        let (q, rest) = qkv.split_at(q_len);
        let (k, v) = rest.split_at(kv_len);
        let (n, m, d) = (dims.queries, dims.keys, dims.head_dim);
        let scale = 1.0 / (d as f32).sqrt();
        // Per task: [dq (n, d) | dk (m, d) | dv (m, d)].
        let task_len = (n + 2 * m) * d;
        let mut blocks = vec![0f32; dims.batch * dims.heads * task_len];
        dims.for_each_task(&mut blocks, task_len, |task, out, parallelism| {
            let (dq, rest) = out.split_at_mut(n * d);
            let (dk, dv) = rest.split_at_mut(m * d);
            let mut probs = vec![0f32; n * m];
            let mask = self.mask.as_deref().map(|m| m.as_slice());
            dims.probabilities(q, k, mask, task, &mut probs, parallelism)?;
            let d_out = dims.head(grad, n, task);
            // dV = P^T dO
            matmul_into(dv, false, View::new(&probs, 0, (m, n), (1, m)), d_out, parallelism)?;
            // dP = dO V^T
            let mut d_scores = vec![0f32; n * m];
            matmul_into(&mut d_scores, false, d_out, dims.head_t(v, m, task), parallelism)?;
            // dS = P (dP - rowsum(dP P)) * scale, in place of dP.
            for (ds, p) in d_scores.chunks_mut(m).zip(probs.chunks(m)) {
                let dot: f32 = ds.iter().zip(p).map(|(a, b)| a * b).sum();
                for (a, &b) in ds.iter_mut().zip(p) {
                    *a = b * (*a - dot) * scale;
                }
            }
            // dQ = dS K, dK = dS^T Q
            matmul_into(
                dq,
                false,
                View::new(&d_scores, 0, (n, m), (m, 1)),
                dims.head(k, m, task),
                parallelism,
            )?;
            matmul_into(
                dk,
                false,
                View::new(&d_scores, 0, (m, n), (1, m)),
                dims.head(q, n, task),
                parallelism,
            )
        })?;
        // Split the per-task blocks by kind, then each kind back into its (b, rows, h*d) layout.
        let tasks = dims.batch * dims.heads;
        let mut by_kind = [
            Vec::with_capacity(tasks * n * d),
            Vec::with_capacity(tasks * m * d),
            Vec::with_capacity(tasks * m * d),
        ];
        for block in blocks.chunks(task_len) {
            by_kind[0].extend_from_slice(&block[..n * d]);
            by_kind[1].extend_from_slice(&block[n * d..(n + m) * d]);
            by_kind[2].extend_from_slice(&block[(n + m) * d..]);
        }
        let mut packed = Vec::with_capacity(q_len + 2 * kv_len);
        dims.gather_heads(&by_kind[0], n, &mut packed);
        dims.gather_heads(&by_kind[1], m, &mut packed);
        dims.gather_heads(&by_kind[2], m, &mut packed);
        let len = packed.len();
        Ok((CpuStorage::F32(packed), Shape::from(len)))
    }
}

// ---------------------------------------------------------------------------------------------
// GELU and GEGLU

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
    use candle_core::{DType, Device, Var};

    /// Gradients of sum(f(inputs) * probe) for our op and for candle's ops on f64 copies.
    fn compare(
        inputs: &[Tensor],
        ours: impl Fn(&[Tensor]) -> Result<Tensor>,
        reference: impl Fn(&[Tensor]) -> Result<Tensor>,
        tolerance: f64,
        label: &str,
    ) {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = ours(&tensors).unwrap();
        let probe = Tensor::randn(0f32, 1., out.shape(), &Device::Cpu).unwrap();
        let grads = (&out * &probe).unwrap().sum_all().unwrap().backward().unwrap();

        let vars64: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap())
            .collect();
        let tensors64: Vec<Tensor> = vars64.iter().map(|v| v.as_tensor().clone()).collect();
        let out64 = reference(&tensors64).unwrap();
        let rel = |a: &Tensor, b: &Tensor| -> f64 {
            let a = a.to_dtype(DType::F64).unwrap();
            let scale = b
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
                .max(1e-12);
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
                / scale
        };
        let out_diff = rel(&out, &out64);
        assert!(out_diff < tolerance, "{label}: forward differs by {out_diff:e}");
        let grads64 = (&out64 * probe.to_dtype(DType::F64).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (i, (v, v64)) in vars.iter().zip(&vars64).enumerate() {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{label}: no gradient for input {i}"));
            let g64 = grads64.get(v64.as_tensor()).expect("reference gradient");
            let diff = rel(g, g64);
            assert!(diff < tolerance, "{label}: gradient {i} differs by {diff:e}");
        }
    }

    fn randn(shape: &[usize]) -> Tensor {
        Tensor::randn(0f32, 1., shape, &Device::Cpu).unwrap()
    }

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

    #[test]
    fn attention_gradients_match_candles() {
        for &(b, n, m, heads, d) in &[
            (2, 5, 7, 2, 4),
            (1, 64, 77, 4, 8),
            (3, 16, 16, 1, 32),
            (2, 77, 77, 2, 8),
        ] {
            // A causal mask where queries and keys are the same tokens (CLIP's).
            let mask = (n == m).then(|| crate::model::attention::causal_mask(n, &Device::Cpu).unwrap());
            let inputs = [
                randn(&[b, n, heads * d]),
                randn(&[b, m, heads * d]),
                randn(&[b, m, heads * d]),
            ];
            compare(
                &inputs,
                |t| attention(&t[0], &t[1], &t[2], heads, mask.as_ref()),
                |t| {
                    let split = |x: &Tensor, rows: usize| x.reshape((b, rows, heads, d))?.transpose(1, 2)?.contiguous();
                    let (q, k, v) = (split(&t[0], n)?, split(&t[1], m)?, split(&t[2], m)?);
                    let mut scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?;
                    if let Some(mask) = &mask {
                        scores = scores.broadcast_add(&mask.to_dtype(DType::F64)?)?;
                    }
                    let probs = candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?;
                    probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, heads * d))
                },
                2e-5,
                &format!("attention {b} {n} {m} {heads} {d}"),
            );
        }
    }

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
