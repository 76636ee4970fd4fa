//! Resizing latents as torch's `F.interpolate(x, size=(h, w), mode=..., antialias=...)` does
//! (`align_corners=False`), which is how AUTOMATIC1111's hires fix upscales latents
//! (`processing.py` `sample_hr_pass`, its "Latent ..." upscalers, `shared.latent_upscale_modes`).
//!
//! Each mode is a 1-D resampling applied along the width and along the height: every output index
//! reads a few input indices with weights ([`taps`]). The weights and indices follow ATen's CPU
//! kernels (`UpSample.h`, `UpSampleKernel.cpp`) including their f32 arithmetic where it decides an
//! index:
//! - nearest: `floor(i * in/out)` (with ATen's shortcuts at 1x and 2x, which give the same);
//! - nearest-exact: `floor((i + 0.5) * in/out)`;
//! - bilinear: source `(i + 0.5) * in/out - 0.5`, clamped at 0, two taps;
//! - bicubic: the same source unclamped, Keys' kernel with a = -0.75, four taps clamped to the
//!   border;
//! - the antialiased ones (`_upsample_bilinear2d_aa`, `_upsample_bicubic2d_aa`): a triangle or
//!   Keys a = -0.5 filter, widened by the scale when shrinking, taps outside the input dropped and
//!   the rest renormalised (so bicubic-antialiased differs from bicubic even when enlarging).
//!
//! Latents are small (a 1024 px SDXL picture's are 4 x 128 x 128), so this runs on the CPU, in
//! f32 in ATen's order of operations; it agrees with torch within 1e-6 (tests/hires.rs).

use candle_core::{DType, Device, Result, Tensor};

/// How [`interpolate`] resamples: torch's `mode`, with or without `antialias`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Interpolation {
    Nearest,
    NearestExact,
    Bilinear,
    BilinearAntialias,
    Bicubic,
    BicubicAntialias,
}

impl Interpolation {
    pub const ALL: [Interpolation; 6] = [
        Self::Bilinear,
        Self::BilinearAntialias,
        Self::Bicubic,
        Self::BicubicAntialias,
        Self::Nearest,
        Self::NearestExact,
    ];

    /// torch's `mode` and `antialias` arguments.
    pub fn torch_args(self) -> (&'static str, bool) {
        match self {
            Self::Nearest => ("nearest", false),
            Self::NearestExact => ("nearest-exact", false),
            Self::Bilinear => ("bilinear", false),
            Self::BilinearAntialias => ("bilinear", true),
            Self::Bicubic => ("bicubic", false),
            Self::BicubicAntialias => ("bicubic", true),
        }
    }
}

/// Keys' cubic convolution kernel with parameter `a` (ATen's `cubic_convolution1/2`).
fn cubic(x: f32, a: f32) -> f32 {
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    } else {
        0.0
    }
}

/// The antialiasing cubic filter of ATen (`HelperInterpCubic::aa_filter`, a = -0.5).
fn cubic_aa(x: f32) -> f32 {
    const A: f32 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// The antialiasing triangle filter (`HelperInterpLinear::aa_filter`).
fn triangle(x: f32) -> f32 {
    (1.0 - x.abs()).max(0.0)
}

/// The source coordinate of output index `i`, `scale * (i + 0.5) - 0.5` (align_corners=False):
/// torch's values are those of this product taken in f64 from the f32 scale, then rounded to f32
/// (measured against torch 2.15: within 2.4e-7 this way, 1.2e-6 with the product in f32).
fn source_index(scale: f32, i: usize) -> f32 {
    (scale as f64 * (i as f64 + 0.5) - 0.5) as f32
}

/// For each of `output` indices, the input indices it reads and their weights, resampling
/// `input` values to `output` by `mode`.
pub fn taps(mode: Interpolation, input: usize, output: usize) -> Vec<Vec<(usize, f32)>> {
    // `compute_scales_value` / `area_pixel_compute_scale`: in / out, in f32.
    let scale = input as f32 / output as f32;
    let last = input as i64 - 1;
    let clamp = |i: i64| i.clamp(0, last) as usize;
    (0..output)
        .map(|i| match mode {
            Interpolation::Nearest => {
                let src = if output == input {
                    i as i64
                } else if output == 2 * input {
                    (i >> 1) as i64
                } else {
                    ((i as f32) * scale).floor() as i64
                };
                vec![(clamp(src.min(last)), 1.0)]
            }
            Interpolation::NearestExact => {
                let src = ((i as f64 + 0.5) * scale as f64) as f32;
                vec![(clamp((src.floor() as i64).min(last)), 1.0)]
            }
            Interpolation::Bilinear => {
                if output == input {
                    return vec![(i, 1.0)];
                }
                let src = source_index(scale, i).max(0.0);
                let i0 = (src.floor() as i64).min(last);
                let lambda1 = (src - i0 as f32).clamp(0.0, 1.0);
                let i1 = if i0 < last { i0 + 1 } else { i0 };
                vec![(clamp(i0), 1.0 - lambda1), (clamp(i1), lambda1)]
            }
            Interpolation::Bicubic => {
                let src = source_index(scale, i);
                let i0 = (src.floor() as i64).min(last);
                let t = (src - i0 as f32).clamp(0.0, 1.0);
                const A: f32 = -0.75;
                // `get_cubic_upsample_coefficients`: the far taps from t + 1 and (1 - t) + 1.
                let x2 = 1.0 - t;
                let weights = [cubic(t + 1.0, A), cubic(t, A), cubic(x2, A), cubic(x2 + 1.0, A)];
                (0..4).map(|k| (clamp(i0 - 1 + k as i64), weights[k])).collect()
            }
            Interpolation::BilinearAntialias | Interpolation::BicubicAntialias => {
                let (half_width, filter): (f32, fn(f32) -> f32) = match mode {
                    Interpolation::BilinearAntialias => (1.0, triangle),
                    _ => (2.0, cubic_aa),
                };
                // `_compute_index_ranges_weights`: the filter widens by the scale when shrinking.
                let (support, invscale) = if scale >= 1.0 {
                    (half_width * scale, 1.0 / scale)
                } else {
                    (half_width, 1.0)
                };
                let center = (scale as f64 * (i as f64 + 0.5)) as f32;
                let xmin = ((center as f64 - support as f64 + 0.5) as i64).max(0);
                let xmax = ((center as f64 + support as f64 + 0.5) as i64).min(input as i64);
                let mut weights: Vec<(usize, f32)> = (xmin..xmax)
                    .map(|j| {
                        let x = ((j as f32 - center) as f64 + 0.5) as f32 * invscale;
                        (j as usize, filter(x))
                    })
                    .collect();
                let total: f32 = weights.iter().map(|(_, w)| w).sum();
                if total != 0.0 {
                    for (_, w) in &mut weights {
                        *w /= total;
                    }
                }
                weights
            }
        })
        .collect()
}

/// `sum(w_k * x_k)` over `taps` in f32 from the first tap on, as ATen accumulates
/// (`output = t * w; output += t * w` in the scalar type for f32 input).
fn weighted(taps: &[(usize, f32)], value: impl Fn(usize) -> f32) -> f32 {
    let mut out = 0.0f32;
    for (k, &(index, weight)) in taps.iter().enumerate() {
        let term = value(index) * weight;
        out = if k == 0 { term } else { out + term };
    }
    out
}

/// Resamples row-major planes `values`, `planes` of `height` x `width`, to `out_h` x `out_w`, in
/// f32 in ATen's order: the plain modes nest the width's taps inside the height's
/// (`upsample_generic_Nd_kernel_impl`); the antialiased ones resample every row first, to f32,
/// then the columns (`separable_upsample_generic_Nd_kernel_impl`).
pub fn interpolate_planes(
    values: &[f32],
    planes: usize,
    (height, width): (usize, usize),
    (out_h, out_w): (usize, usize),
    mode: Interpolation,
) -> Vec<f32> {
    let rows = taps(mode, height, out_h);
    let cols = taps(mode, width, out_w);
    let separable = matches!(mode, Interpolation::BilinearAntialias | Interpolation::BicubicAntialias);
    let mut out = Vec::with_capacity(planes * out_h * out_w);
    for plane in values.chunks_exact(height * width).take(planes) {
        if separable {
            // (height, out_w), then (out_h, out_w).
            let across: Vec<f32> = (0..height)
                .flat_map(|y| cols.iter().map(move |col| weighted(col, |x| plane[y * width + x])))
                .collect();
            for row in &rows {
                for x in 0..out_w {
                    out.push(weighted(row, |y| across[y * out_w + x]));
                }
            }
        } else {
            for row in &rows {
                for col in &cols {
                    out.push(weighted(row, |y| weighted(col, |x| plane[y * width + x])));
                }
            }
        }
    }
    out
}

/// `F.interpolate(latents, size=(out_h, out_w), mode, antialias)` for (b, c, h, w) latents, f32,
/// computed on the CPU and returned on the latents' device.
pub fn interpolate(latents: &Tensor, (out_h, out_w): (usize, usize), mode: Interpolation) -> Result<Tensor> {
    let (b, c, h, w) = latents.dims4()?;
    let device = latents.device().clone();
    let values = latents
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let out = interpolate_planes(&values, b * c, (h, w), (out_h, out_w), mode);
    Tensor::from_vec(out, (b, c, out_h, out_w), &Device::Cpu)?.to_device(&device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_and_same_size_is_identity() {
        for mode in Interpolation::ALL {
            for (input, output) in [(4, 8), (8, 12), (7, 13), (16, 10), (5, 5)] {
                for (i, row) in taps(mode, input, output).iter().enumerate() {
                    let total: f32 = row.iter().map(|(_, w)| w).sum();
                    assert!((total - 1.0).abs() < 1e-6, "{mode:?} {input}->{output} [{i}]: {total}");
                    assert!(row.iter().all(|&(j, _)| j < input));
                }
            }
            let values: Vec<f32> = (0..12).map(|v| v as f32).collect();
            assert_eq!(interpolate_planes(&values, 1, (3, 4), (3, 4), mode), values, "{mode:?}");
        }
    }

    /// At exactly 2x, nearest and nearest-exact agree; at 1.5x they do not (torch's behaviour).
    #[test]
    fn nearest_and_nearest_exact() {
        let idx = |mode, i, o| taps(mode, i, o).iter().map(|t| t[0].0).collect::<Vec<_>>();
        assert_eq!(
            idx(Interpolation::Nearest, 4, 8),
            idx(Interpolation::NearestExact, 4, 8)
        );
        assert_eq!(idx(Interpolation::Nearest, 2, 3), vec![0, 0, 1]);
        assert_eq!(idx(Interpolation::NearestExact, 2, 3), vec![0, 1, 1]);
    }
}
