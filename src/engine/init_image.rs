//! The pictures img2img and inpainting start from, and what is done to them in pixel space:
//! decoding, resizing to the requested size (`--resize`), the mask's binarising, blur and the
//! paste-back of the kept pixels after decoding.
//!
//! Matches diffusers' `VaeImageProcessor` where a parity test can see it: images go to [-1, 1] as
//! `x / 127.5 - 1`; masks are binarised at 0.5 (`do_binarize`) and reach the latents by
//! nearest-neighbour sampling (`F.interpolate(mask, size)`, which for a factor f picks pixel
//! (f i, f j)). Resizing uses Lanczos-3, as diffusers' default `resample="lanczos"`.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use image::imageops::{self, FilterType};
use image::{GrayImage, Luma, RgbImage};

/// How a picture of another size is fitted to the requested one (`--resize`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ResizeMode {
    /// Scale to cover, then cut the middle out (nothing is stretched, the edges may be lost).
    #[default]
    Crop,
    /// Scale to fit inside, then fill the rest by extending the edge pixels (nothing is lost).
    Fit,
    /// Scale each side on its own (the aspect ratio changes).
    Stretch,
}

impl ResizeMode {
    pub const ALL: [ResizeMode; 3] = [Self::Crop, Self::Fit, Self::Stretch];

    pub fn name(self) -> &'static str {
        match self {
            Self::Crop => "crop",
            Self::Fit => "fit",
            Self::Stretch => "stretch",
        }
    }
}

impl fmt::Display for ResizeMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ResizeMode {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("unknown resize mode {s:?}; expected crop, fit or stretch"))
    }
}

/// How the encoded picture's latents are taken from the VAE's Gaussian (`--vae-encode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum VaeEncodeMode {
    /// A sample, `mean + std * z` with z from the image's seed (diffusers' and AUTOMATIC1111's
    /// default).
    #[default]
    Sample,
    /// The mean (diffusers' `sample_mode="argmax"`): deterministic without a seed.
    Mean,
}

impl VaeEncodeMode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Sample => "sample",
            Self::Mean => "mean",
        }
    }
}

impl fmt::Display for VaeEncodeMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for VaeEncodeMode {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "sample" => Ok(Self::Sample),
            "mean" => Ok(Self::Mean),
            _ => Err(format!("unknown VAE encode mode {s:?}; expected sample or mean")),
        }
    }
}

/// A decoded picture and where it came from (recorded in the images made from it).
#[derive(Debug, Clone)]
pub struct SourcePicture<P> {
    pub pixels: P,
    /// The file as the user named it (or another label, e.g. a server field).
    pub name: String,
    /// Lower-case hex SHA-256 of the file's bytes, to tell it was not changed before a re-run.
    pub sha256: String,
}

/// The picture img2img starts from.
pub type InitImage = SourcePicture<RgbImage>;
/// The inpainting mask, as grey levels: white repaints, black keeps.
pub type MaskImage = SourcePicture<GrayImage>;

pub use crate::weights::hash::sha256_bytes as sha256_hex;

/// Decodes a picture; errors name it by `name` only (each front end adds its field's name).
fn decode(bytes: &[u8], name: &str) -> Result<image::DynamicImage> {
    let image = image::load_from_memory(bytes)
        .with_context(|| format!("{name}: not a picture sdfix can read (PNG, JPEG or WebP)"))?;
    ensure!(image.width() > 0 && image.height() > 0, "{name}: the picture is empty");
    Ok(image)
}

impl InitImage {
    /// Decodes an init picture from its file's bytes; `name` labels it in errors and records.
    pub fn decode(bytes: &[u8], name: &str) -> Result<Arc<Self>> {
        let pixels = decode(bytes, name)?.to_rgb8();
        Ok(Arc::new(Self {
            pixels,
            name: name.to_string(),
            sha256: sha256_hex(bytes),
        }))
    }
}

impl MaskImage {
    /// Decodes a mask from its file's bytes; colour masks are turned to grey (luma) and an alpha
    /// channel is ignored.
    pub fn decode(bytes: &[u8], name: &str) -> Result<Arc<Self>> {
        let pixels = decode(bytes, name)?.to_luma8();
        Ok(Arc::new(Self {
            pixels,
            name: name.to_string(),
            sha256: sha256_hex(bytes),
        }))
    }
}

/// `(width, height)` of the picture, rounded down to multiples of `factor` (the size img2img
/// makes when no size is asked for), or an error when a side is smaller than `factor`.
pub fn own_size(width: u32, height: u32, factor: usize, name: &str) -> Result<(usize, usize)> {
    let (w, h) = (width as usize / factor * factor, height as usize / factor * factor);
    ensure!(
        w > 0 && h > 0,
        "{name}: {width}x{height} is smaller than the VAE's {factor} px"
    );
    Ok((w, h))
}

/// Resizes `image` to `width` x `height` by `mode`, with `filter`.
fn fit_to<P>(
    image: &image::ImageBuffer<P, Vec<P::Subpixel>>,
    width: u32,
    height: u32,
    mode: ResizeMode,
    filter: FilterType,
) -> image::ImageBuffer<P, Vec<P::Subpixel>>
where
    P: image::Pixel + 'static,
    P::Subpixel: 'static,
{
    let (w, h) = image.dimensions();
    if (w, h) == (width, height) {
        return image.clone();
    }
    match mode {
        ResizeMode::Stretch => imageops::resize(image, width, height, filter),
        ResizeMode::Crop => {
            let scale = f64::max(width as f64 / w as f64, height as f64 / h as f64);
            let (sw, sh) = (
                ((w as f64 * scale).round() as u32).max(width),
                ((h as f64 * scale).round() as u32).max(height),
            );
            let scaled = imageops::resize(image, sw, sh, filter);
            imageops::crop_imm(&scaled, (sw - width) / 2, (sh - height) / 2, width, height).to_image()
        }
        ResizeMode::Fit => {
            let scale = f64::min(width as f64 / w as f64, height as f64 / h as f64);
            let (sw, sh) = (
                ((w as f64 * scale).round() as u32).clamp(1, width),
                ((h as f64 * scale).round() as u32).clamp(1, height),
            );
            let scaled = imageops::resize(image, sw, sh, filter);
            let (ox, oy) = ((width - sw) / 2, (height - sh) / 2);
            // Outside the scaled picture, the nearest edge pixel (AUTOMATIC1111's "resize and fill"
            // extends the edges the same way).
            image::ImageBuffer::from_fn(width, height, |x, y| {
                let sx = x.saturating_sub(ox).min(sw - 1);
                let sy = y.saturating_sub(oy).min(sh - 1);
                *scaled.get_pixel(sx, sy)
            })
        }
    }
}

/// The init picture at the size to make, by `mode`.
pub fn resize_image(image: &RgbImage, width: usize, height: usize, mode: ResizeMode) -> RgbImage {
    fit_to(image, width as u32, height as u32, mode, FilterType::Lanczos3)
}

/// The mask at the size to make, by `mode` (as the image), binarised at 0.5 as diffusers'
/// mask processor does: 255 repaints, 0 keeps.
pub fn resize_mask(mask: &GrayImage, width: usize, height: usize, mode: ResizeMode) -> GrayImage {
    let mut resized = fit_to(mask, width as u32, height as u32, mode, FilterType::Lanczos3);
    for Luma([v]) in resized.pixels_mut() {
        *v = if *v >= 128 { 255 } else { 0 };
    }
    resized
}

/// The mask at latent resolution as 0/1 values, row-major: pixel (f i, f j) of the binarised
/// mask (diffusers' nearest `F.interpolate` to the latent size).
pub fn latent_mask(mask: &GrayImage, factor: usize) -> Vec<f32> {
    let (w, h) = (mask.width() as usize / factor, mask.height() as usize / factor);
    let mut values = Vec::with_capacity(w * h);
    for i in 0..h {
        for j in 0..w {
            let Luma([v]) = *mask.get_pixel((j * factor) as u32, (i * factor) as u32);
            values.push(if v >= 128 { 1.0 } else { 0.0 });
        }
    }
    values
}

/// The binarised mask blurred by a Gaussian of `sigma` px (`--mask-blur`), as weights in [0, 1]
/// for the paste-back. The kernel is cut at 2.5 sigma (AUTOMATIC1111's kernel size), so pixels
/// further than that from the repainted region keep weight 0 exactly.
pub fn paste_weights(mask: &GrayImage, sigma: f64) -> Vec<f32> {
    let values: Vec<f32> = mask.pixels().map(|Luma([v])| *v as f32 / 255.0).collect();
    if sigma <= 0.0 {
        return values;
    }
    let radius = (2.5 * sigma).ceil() as isize;
    let kernel: Vec<f32> = (-radius..=radius)
        .map(|d| (-((d * d) as f64) / (2.0 * sigma * sigma)).exp() as f32)
        .collect();
    let total: f32 = kernel.iter().sum();
    let kernel: Vec<f32> = kernel.iter().map(|k| k / total).collect();
    let (w, h) = (mask.width() as isize, mask.height() as isize);
    // Separable: rows, then columns; edges clamp (the image's border extends).
    let blur = |src: &[f32], horizontal: bool| -> Vec<f32> {
        let mut out = vec![0.0f32; src.len()];
        for y in 0..h {
            for x in 0..w {
                let mut sum = 0.0;
                for (k, weight) in kernel.iter().enumerate() {
                    let d = k as isize - radius;
                    let (sx, sy) = if horizontal {
                        ((x + d).clamp(0, w - 1), y)
                    } else {
                        (x, (y + d).clamp(0, h - 1))
                    };
                    sum += weight * src[(sy * w + sx) as usize];
                }
                out[(y * w + x) as usize] = sum;
            }
        }
        out
    };
    let blurred = blur(&blur(&values, true), false);
    // A sum of zeros is exactly 0; clamp rounding above 1.
    blurred.into_iter().map(|v| v.clamp(0.0, 1.0)).collect()
}

/// Puts the original pixels back where `weights` (one per pixel) is below 1: `original * (1 - m)
/// + generated * m`, rounded. Where m = 0 the original bytes come back unchanged.
pub fn paste_back(generated: &mut [u8], original: &RgbImage, weights: &[f32]) {
    for ((pixel, source), &m) in generated.chunks_exact_mut(3).zip(original.pixels()).zip(weights) {
        for (out, &kept) in pixel.iter_mut().zip(&source.0) {
            *out = if m <= 0.0 {
                kept
            } else if m >= 1.0 {
                *out
            } else {
                (kept as f32 * (1.0 - m) + *out as f32 * m).round() as u8
            };
        }
    }
}

/// (3, H, W) values in [-1, 1] of an 8-bit picture, row-major planes: `x / 127.5 - 1`.
pub fn to_unit_planes(image: &RgbImage, keep: Option<&GrayImage>) -> Vec<f32> {
    let (w, h) = image.dimensions();
    let mut planes = vec![0.0f32; 3 * (w * h) as usize];
    for (index, (x, y, pixel)) in image.enumerate_pixels().enumerate() {
        // The masked picture of a 9-channel inpainting model: repainted pixels are 0 (grey),
        // as diffusers' `init_image * (mask < 0.5)`.
        let masked = keep.is_some_and(|m| m.get_pixel(x, y).0[0] >= 128);
        for c in 0..3 {
            planes[c * (w * h) as usize + index] = if masked { 0.0 } else { pixel.0[c] as f32 / 127.5 - 1.0 };
        }
    }
    planes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 10) as u8, (y * 10) as u8, 128]))
    }

    #[test]
    fn every_mode_gives_the_asked_size() {
        let image = gradient(20, 10);
        for mode in ResizeMode::ALL {
            for (w, h) in [(16, 16), (8, 24), (40, 20), (20, 10)] {
                let out = resize_image(&image, w, h, mode);
                assert_eq!(out.dimensions(), (w as u32, h as u32), "{mode} {w}x{h}");
            }
        }
    }

    #[test]
    fn same_size_is_untouched() {
        let image = gradient(16, 8);
        assert_eq!(resize_image(&image, 16, 8, ResizeMode::Crop), image);
    }

    #[test]
    fn fit_extends_the_edges() {
        // A 2:1 picture fitted into a square: rows above and below repeat the edge rows.
        let image = gradient(20, 10);
        let out = resize_image(&image, 20, 20, ResizeMode::Fit);
        assert_eq!(out.get_pixel(3, 0), out.get_pixel(3, 5));
        assert_eq!(out.get_pixel(3, 19), out.get_pixel(3, 14));
    }

    #[test]
    fn masks_are_binarised_and_sampled_at_the_factor() {
        let mask = GrayImage::from_fn(4, 4, |x, _| Luma([if x >= 2 { 200 } else { 100 }]));
        let resized = resize_mask(&mask, 4, 4, ResizeMode::Crop);
        assert!(resized.pixels().all(|p| p.0[0] == 0 || p.0[0] == 255));
        assert_eq!(latent_mask(&resized, 2), vec![0.0, 1.0, 0.0, 1.0]);
    }

    #[test]
    fn paste_back_keeps_far_pixels_exactly() {
        let mask = GrayImage::from_fn(32, 8, |x, _| Luma([if x >= 24 { 255 } else { 0 }]));
        let weights = paste_weights(&mask, 2.0);
        // 2.5 sigma = 5 px: columns < 19 are untouched, the repainted side stays 1 inside.
        assert!(weights.iter().enumerate().all(|(i, &m)| i % 32 >= 19 || m == 0.0));
        assert!(weights[31] > 0.99);
        let original = gradient(32, 8);
        let mut generated = vec![7u8; 32 * 8 * 3];
        paste_back(&mut generated, &original, &weights);
        for (i, (out, kept)) in generated.chunks(3).zip(original.pixels()).enumerate() {
            if i % 32 < 19 {
                assert_eq!(out, &kept.0[..]);
            }
        }
    }

    #[test]
    fn unit_planes_follow_diffusers() {
        let image = RgbImage::from_fn(2, 1, |x, _| image::Rgb(if x == 0 { [0, 255, 51] } else { [255, 0, 0] }));
        let planes = to_unit_planes(&image, None);
        assert_eq!(planes[0], -1.0);
        assert_eq!(planes[2], 1.0);
        assert!((planes[4] - (51.0 / 127.5 - 1.0)).abs() < 1e-7);
        let keep = GrayImage::from_fn(2, 1, |x, _| Luma([if x == 1 { 255 } else { 0 }]));
        assert_eq!(to_unit_planes(&image, Some(&keep))[1], 0.0);
    }
}
