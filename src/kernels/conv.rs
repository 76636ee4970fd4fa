//! 2-D convolution on the CPU in f32, as a candle custom op.
//!
//! candle 0.11.1's CPU conv2d rebuilds an im2col tile element by element and reshuffles the
//! weights on every call, which made it the largest single cost of a UNet step (see
//! docs/performance.md). Ours needs no im2col at all: with the input zero-padded to
//! (c_in, h + 2p, w + 2p) and flattened, the input pixels tap (ky, kx) reads for output pixel
//! (oy, ox) sit at `s * (oy * wp + ox) + ky * wp + kx`: one strided matrix view per tap. The
//! convolution is then kh x kw accumulating matrix products
//! `out[c_out, j] += W[ky, kx][c_out, c_in] @ P[c_in, s * j + ky * wp + kx]` over an output grid
//! `wp` pixels wide, whose `wp - ow` extra columns per row are computed and dropped. The output is
//! tiled by rows so each tile stays in cache across the taps; tiles run in parallel.
//!
//! The weights are read tap-major, (k, k, c_out, c_in): [`tap_major_weight`] lays them out once,
//! at load; [`conv2d_f32`] runs the convolution.

use std::mem::MaybeUninit;

use candle_core::{Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::kernels::cpu_op::{apply_weighted, transpose_2d, SharedOut, WeightedKernel};

/// A convolution with square kernels, equal padding on all sides, dilation 1, one group: what
/// SD's UNet and VAE use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConvSpec {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Side of the square kernel.
    pub kernel: usize,
    pub padding: usize,
    pub stride: usize,
}

/// `weight` (c_out, c_in, kh, kw), f32 on the CPU, as (kh, kw, c_out, c_in): each tap's
/// (c_out, c_in) matrix contiguous, the layout [`conv2d_f32`] reads.
pub fn tap_major_weight(weight: &Tensor) -> Result<Tensor> {
    // The permutation (2, 3, 0, 1) is the transpose of (c_out * c_in, kh * kw).
    let (c_out, c_in, kh, kw) = weight.dims4()?;
    transpose_2d(&weight.contiguous()?.reshape((c_out * c_in, kh * kw))?)?.reshape((kh, kw, c_out, c_in))
}

/// `x` (b, c_in, h, w), f32 on the CPU (made contiguous), convolved with `taps` (tap-major, from
/// [`tap_major_weight`]), plus `bias` (c_out) when given: (b, c_out, oh, ow).
pub fn conv2d_f32(x: &Tensor, taps: &Tensor, bias: Option<&Tensor>, spec: ConvSpec) -> Result<Tensor> {
    apply_weighted(CpuConv(spec), x, taps, bias)
}

/// The CPU kernel: input (b, c_in, h, w), tap-major weights, optional bias.
struct CpuConv(ConvSpec);

impl WeightedKernel for CpuConv {
    const NAME: &'static str = "sdfix-conv2d";

    fn run(
        &self,
        (x, x_l): (&[f32], &Layout),
        (taps, taps_l): (&[f32], &Layout),
        bias: Option<&[f32]>,
    ) -> Result<(Vec<f32>, Shape)> {
        let spec = self.0;
        let (batch, in_channels, height, width) = x_l.shape().dims4()?;
        if in_channels != spec.in_channels {
            candle_core::bail!(
                "conv2d: input has {in_channels} channels, the weights expect {}",
                spec.in_channels
            )
        }
        let expected = [spec.kernel, spec.kernel, spec.out_channels, spec.in_channels];
        if taps_l.shape().dims() != expected {
            candle_core::bail!("conv2d: tap-major weights {:?}, expected {expected:?}", taps_l.shape())
        }
        let geometry = Geometry::new(spec, height, width)?;
        let out = conv_f32(spec, &geometry, batch, x, taps, bias);
        Ok((
            out,
            Shape::from((batch, spec.out_channels, geometry.out_h, geometry.out_w)),
        ))
    }
}

/// Sizes of the padded input and of the output grid.
#[derive(Debug)]
pub(crate) struct Geometry {
    /// Padded input width: the output grid's row pitch.
    pub(crate) padded_w: usize,
    /// Elements per padded input channel, plus the slack the last channel's dropped columns read.
    pub(crate) channel_len: usize,
    pub(crate) out_h: usize,
    pub(crate) out_w: usize,
    padding: usize,
    height: usize,
    width: usize,
}

impl Geometry {
    pub(crate) fn new(spec: ConvSpec, height: usize, width: usize) -> Result<Self> {
        let (padded_h, padded_w) = (height + 2 * spec.padding, width + 2 * spec.padding);
        if padded_h < spec.kernel || padded_w < spec.kernel || spec.stride == 0 {
            candle_core::bail!(
                "conv2d: a {height}x{width} input is smaller than the {0}x{0} kernel",
                spec.kernel
            )
        }
        let out_h = (padded_h - spec.kernel) / spec.stride + 1;
        let out_w = (padded_w - spec.kernel) / spec.stride + 1;
        // The furthest element any tap reads, counted from its channel's start.
        let last_read = (out_h * padded_w - 1) * spec.stride + (spec.kernel - 1) * (padded_w + 1);
        let channel_len = (padded_h * padded_w).max(last_read + 1);
        Ok(Self {
            padded_w,
            channel_len,
            out_h,
            out_w,
            padding: spec.padding,
            height,
            width,
        })
    }

    /// One sample's channels zero-padded into `dst` (c_in x channel_len), every element written
    /// (so `dst` need not be zeroed first).
    pub(crate) fn pad(&self, src: &[f32], dst: &mut [MaybeUninit<f32>]) {
        let (h, w, p, wp) = (self.height, self.width, self.padding, self.padded_w);
        let zero = |dst: &mut [MaybeUninit<f32>]| dst.iter_mut().for_each(|d| _ = d.write(0.0));
        dst.par_chunks_mut(self.channel_len)
            .zip(src.par_chunks(h * w))
            .for_each(|(dst, src)| {
                zero(&mut dst[..p * wp]);
                for (y, row) in src.chunks(w).enumerate() {
                    let start = (y + p) * wp;
                    zero(&mut dst[start..start + p]);
                    for (d, &x) in dst[start + p..start + p + w].iter_mut().zip(row) {
                        d.write(x);
                    }
                    zero(&mut dst[start + p + w..start + wp]);
                }
                zero(&mut dst[(h + p) * wp..]);
            });
    }
}

/// Outputs per tile: 1 MB of f32, half this machine's 2 MB L2 per core.
const TILE_OUTPUTS: usize = 262_144;

/// The convolution of `batch` samples `x` (contiguous (b, c_in, h, w) for `g`'s h and w) with
/// tap-major `taps`: (b, c_out, out_h, out_w) elements.
pub(crate) fn conv_f32(
    spec: ConvSpec,
    g: &Geometry,
    batch: usize,
    x: &[f32],
    taps: &[f32],
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let (c_in, c_out, k, s) = (spec.in_channels, spec.out_channels, spec.kernel, spec.stride);
    let wp = g.padded_w;
    // Padding copies the input; a 1x1, unpadded, stride-1 conv reads it in place.
    let in_place = spec.padding == 0 && g.channel_len == g.height * g.width;
    let padded: Vec<f32> = if in_place {
        Vec::new()
    } else {
        // Not zeroed first: `pad` writes every element (a 135 MB memset for the VAE's last convs
        // at 512 px otherwise).
        let len = batch * c_in * g.channel_len;
        let mut padded: Vec<f32> = Vec::with_capacity(len);
        for (src, dst) in x
            .chunks(c_in * g.height * g.width)
            .zip(padded.spare_capacity_mut()[..len].chunks_mut(c_in * g.channel_len))
        {
            g.pad(src, dst);
        }
        // SAFETY: each sample's c_in channels of channel_len elements were all written by `pad`.
        unsafe { padded.set_len(len) };
        padded
    };
    let source = if in_place { x } else { &padded[..] };

    // Rows per tile: about TILE_OUTPUTS f32 outputs (c_out x columns), so a tile's accumulator
    // stays in L2 across the taps; then evened out.
    let target_columns = (TILE_OUTPUTS / c_out).max(512);
    let rows = (target_columns / wp).clamp(1, g.out_h);
    let tiles_per_sample = g.out_h.div_ceil(rows);
    let rows = g.out_h.div_ceil(tiles_per_sample);
    let items = batch * tiles_per_sample;
    let threads = rayon::current_num_threads();
    // Enough tiles: one thread per tile; too few: each product uses every thread.
    let (tile_parallel, gemm_parallelism) = if items >= 2 * threads || items.is_multiple_of(threads) {
        (true, gemm::Parallelism::None)
    } else {
        (false, gemm::Parallelism::Rayon(threads))
    };

    let plane_out = g.out_h * g.out_w;
    // Not zeroed: the tiles below store every output element (their bias pass).
    let mut out: Vec<f32> = Vec::with_capacity(batch * c_out * plane_out);
    let shared = SharedOut::new_uninit(&mut out);
    let run_tile = |item: usize| {
        let (b, tile) = (item / tiles_per_sample, item % tiles_per_sample);
        let y0 = tile * rows;
        let y1 = (y0 + rows).min(g.out_h);
        let columns = (y1 - y0) * wp;
        let mut acc = vec![0f32; c_out * columns];
        let sample = &source[b * c_in * g.channel_len..];
        for ky in 0..k {
            for kx in 0..k {
                let tap = ky * k + kx;
                let offset = s * y0 * wp + ky * wp + kx;
                // SAFETY: lhs is the tap's (c_out, c_in) matrix inside `taps`; rhs reads, for
                // c_in rows `channel_len` apart, columns offset + s * j for j < columns, whose
                // furthest element is within the channel's `channel_len` (Geometry::new);
                // acc is (c_out, columns) row-major.
                unsafe {
                    gemm::gemm(
                        c_out,
                        columns,
                        c_in,
                        acc.as_mut_ptr(),
                        1,
                        columns as isize,
                        tap > 0,
                        taps.as_ptr().add(tap * c_out * c_in),
                        1,
                        c_in as isize,
                        sample.as_ptr().add(offset),
                        s as isize,
                        g.channel_len as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm_parallelism,
                    );
                }
            }
        }
        // Keep the first out_w columns of each grid row, add the bias.
        for c in 0..c_out {
            let add = bias.map_or(0.0, |b| b[c]);
            for y in y0..y1 {
                let src = &acc[c * columns + (y - y0) * wp..][..g.out_w];
                let start = (b * c_out + c) * plane_out + y * g.out_w;
                // SAFETY: (b, c, y) rows belong to this tile alone; in bounds of `out`.
                let dst = unsafe { std::slice::from_raw_parts_mut(shared.ptr().add(start), g.out_w) };
                for (d, v) in dst.iter_mut().zip(src) {
                    *d = v + add;
                }
            }
        }
    };
    if tile_parallel {
        (0..items).into_par_iter().for_each(run_tile);
    } else {
        (0..items).for_each(run_tile);
    }
    // SAFETY: every (sample, channel, row, column) was stored by the tile owning its row.
    unsafe { out.set_len(batch * c_out * plane_out) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu_op::max_abs_diff;
    use candle_core::Device;

    /// Ours against candle's conv2d (im2col), for the shapes SD uses and odd ones.
    #[test]
    fn matches_candles_convolution() {
        let dev = Device::Cpu;
        for &(b, c_in, c_out, h, w, k, p, s) in &[
            (2, 4, 8, 9, 7, 3, 1, 1),
            (1, 3, 5, 8, 8, 3, 1, 2),
            (2, 6, 4, 9, 10, 3, 0, 2),
            (1, 8, 16, 5, 6, 1, 0, 1),
            (2, 5, 3, 4, 4, 3, 1, 1),
            (1, 16, 700, 3, 2, 3, 1, 1),
            (1, 2, 3, 40, 90, 3, 1, 1),
        ] {
            let xs = Tensor::randn(0f32, 1., (b, c_in, h, w), &dev).unwrap();
            let weight = Tensor::randn(0f32, 1., (c_out, c_in, k, k), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1., c_out, &dev).unwrap();
            let expected = xs
                .conv2d(&weight, p, s, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, c_out, 1, 1)).unwrap())
                .unwrap();
            let spec = ConvSpec {
                in_channels: c_in,
                out_channels: c_out,
                kernel: k,
                padding: p,
                stride: s,
            };
            let taps = tap_major_weight(&weight).unwrap();
            let ours = conv2d_f32(&xs, &taps, Some(&bias), spec).unwrap();
            assert_eq!(ours.dims(), expected.dims(), "{b} {c_in} {c_out} {h} {w} {k} {p} {s}");
            let scale = expected.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let diff = max_abs_diff(&ours, &expected) / scale;
            assert!(diff < 1e-5, "{b} {c_in} {c_out} {h} {w} {k} {p} {s}: {diff}");
        }
    }

    #[test]
    fn a_non_contiguous_input_is_made_contiguous() {
        let dev = Device::Cpu;
        let xs = Tensor::randn(0f32, 1., (1, 5, 6, 3), &dev)
            .unwrap()
            .transpose(2, 3)
            .unwrap();
        let weight = Tensor::randn(0f32, 1., (2, 3, 3, 3), &dev).unwrap();
        let spec = ConvSpec {
            in_channels: 3,
            out_channels: 2,
            kernel: 3,
            padding: 1,
            stride: 1,
        };
        let xs = xs.transpose(1, 2).unwrap().narrow(1, 0, 3).unwrap();
        let expected = xs.conv2d(&weight, 1, 1, 1, 1).unwrap();
        let taps = tap_major_weight(&weight).unwrap();
        let ours = conv2d_f32(&xs, &taps, None, spec).unwrap();
        assert!(max_abs_diff(&ours, &expected) < 1e-4);
    }
}
