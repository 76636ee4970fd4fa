//! The hires fix's second pass of a batch (what A1111's `sample_hr_pass` does after the first
//! pass): upscale the first pass's latents, crop them to the hires size, noise them to the first
//! step of the cut schedule with the seed's noise drawn again, and run the same pipeline as
//! img2img. The rules it follows are in [`super::hires`].

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use super::hires::{HiresUpscaler, ResolvedHires};
use super::init_image;
use crate::model::stable_diffusion::StableDiffusion;
use crate::model::unet::Conditioning;
use crate::pipeline::{self, BatchInput, StepInfo};
use crate::sampling::noise::ImageNoise;
use crate::sampling::upscale;

/// What the second pass of one batch starts from.
pub(super) struct SecondPass<'a> {
    pub hires: &'a ResolvedHires,
    /// The first pass's final latents, (b, c, h, w) f32.
    pub lowres: Tensor,
    /// Each image's seed.
    pub seeds: &'a [u64],
    /// The request's own hires noise (`hires_latents`), (b, c, H, W), instead of the seeds'.
    pub noise: Option<Tensor>,
    /// The prompts' conditioning at the hires size (SDXL's micro-conditioning follows it).
    pub cond: &'a [Conditioning],
    pub uncond: Option<&'a [Conditioning]>,
    /// `--vae-tiling`: the Lanczos upscaler's decode and the final decode run in tiles.
    pub vae_tiling: bool,
}

/// Encodes (b, 3, H, W) pictures in [-1, 1] to sampler-scale latents, drawing a posterior sample
/// (when the request asks for one) from the noise it is given: the batch's img2img encode.
pub(super) type Encode<'a> = dyn FnMut(&Tensor, &mut ImageNoise) -> Result<Tensor> + 'a;

/// Runs the second pass; returns the final latents and the 8-bit pictures, as
/// [`pipeline::denoise_and_decode`].
pub(super) fn run(
    model: &StableDiffusion,
    pass: SecondPass,
    encode: &mut Encode,
    on_step: &mut dyn FnMut(&StepInfo) -> Result<()>,
) -> Result<(Tensor, Vec<Vec<u8>>)> {
    let hires = pass.hires;
    let factor = model.vae.downscale_factor();
    // A fresh generator per image from its seed, as A1111's `rng.ImageRNG(shape_hr, seeds)`.
    let mut noise = ImageNoise::new(pass.seeds);
    let upscaled = match hires.upscaler {
        HiresUpscaler::Latent(mode) => upscale::interpolate(&pass.lowres, hires.target.upscaled_latents(factor), mode)?,
        HiresUpscaler::Lanczos => {
            let target = hires.target.upscale_to;
            let pictures = first_pass_pictures(model, &pass.lowres, pass.vae_tiling)?
                .iter()
                .map(|picture| {
                    let resized = lanczos(picture, target.width, target.height);
                    let planes = init_image::to_unit_planes(&resized, None);
                    Ok(Tensor::from_vec(
                        planes,
                        (3, target.height, target.width),
                        &Device::Cpu,
                    )?)
                })
                .collect::<Result<Vec<_>>>()?;
            let pictures = Tensor::stack(&pictures, 0)?.to_device(&model.device)?;
            encode(&pictures, &mut noise)?
        }
    };
    let (top, left, h, w) = hires.target.crop(factor);
    let x0 = upscaled.narrow(2, top, h)?.narrow(3, left, w)?;
    let (c, _, _) = hires.latent_shape;
    let start_noise = match pass.noise {
        Some(latents) => latents.to_device(&model.device)?,
        None => noise.sample((c, h, w), &model.device)?,
    };
    // k-diffusion's `x + noise * sigma[0]`, in sdfix's variance-preserving form (as img2img).
    let a = hires.settings.schedule.alpha_cumprod(0);
    let latents = ((x0 * a.sqrt())? + (start_noise * (1.0 - a).sqrt())?)?;
    let input = BatchInput {
        latents,
        cond: pass.cond,
        uncond: pass.uncond,
        settings: &hires.settings,
        inpainting: None,
        vae_tiling: pass.vae_tiling,
    };
    pipeline::denoise_and_decode(model, input, &mut noise, on_step)
}

/// The first pass decoded to 8-bit pictures as A1111 makes them for its non-latent upscalers:
/// `(x + 1) / 2` clamped to [0, 1], times 255, truncated (`astype(np.uint8)`, not rounded).
fn first_pass_pictures(
    model: &crate::model::stable_diffusion::StableDiffusion,
    latents: &Tensor,
    tiled: bool,
) -> Result<Vec<RgbImage>> {
    let images = pipeline::decode(model, latents, tiled)?;
    let (_, _, h, w) = images.dims4()?;
    let scaled = (((images + 1.0)? / 2.0)?.clamp(0f32, 1f32)? * 255.0)?
        .floor()?
        .to_dtype(DType::U8)?;
    pipeline::to_rgb(&scaled)?
        .into_iter()
        .map(|rgb| {
            RgbImage::from_raw(w as u32, h as u32, rgb)
                .ok_or_else(|| anyhow::anyhow!("internal: a decoded picture has the wrong size"))
        })
        .collect()
}

/// Lanczos's support (a = 3), PIL's `LANCZOS` filter.
const LANCZOS_SUPPORT: f64 = 3.0;
/// Bits of PIL's fixed-point weights for 8-bit pictures (`PRECISION_BITS` = 32 - 8 - 2).
const PRECISION_BITS: u32 = 22;

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

fn lanczos_kernel(x: f64) -> f64 {
    if (-LANCZOS_SUPPORT..LANCZOS_SUPPORT).contains(&x) {
        sinc(x) * sinc(x / LANCZOS_SUPPORT)
    } else {
        0.0
    }
}

/// For each output index, the first input index it reads and its fixed-point weights, as PIL's
/// `precompute_coeffs` and `normalize_coeffs_8bpc`: the kernel widened by the scale when
/// shrinking, taps outside the input dropped, the rest normalised, then rounded to 22 bits.
fn lanczos_coefficients(input: usize, output: usize) -> Vec<(usize, Vec<i64>)> {
    let scale = input as f64 / output as f64;
    let filter_scale = scale.max(1.0);
    let support = LANCZOS_SUPPORT * filter_scale;
    let inverse = 1.0 / filter_scale;
    (0..output)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(input as i64) as usize;
            let weights: Vec<f64> = (xmin..xmax)
                .map(|x| lanczos_kernel((x as f64 - center + 0.5) * inverse))
                .collect();
            let total: f64 = weights.iter().sum();
            let one = (1i64 << PRECISION_BITS) as f64;
            let fixed = weights
                .iter()
                .map(|w| {
                    let w = if total != 0.0 { w / total } else { *w };
                    if w < 0.0 {
                        (-0.5 + w * one) as i64
                    } else {
                        (0.5 + w * one) as i64
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

/// One 8-bit channel value from a fixed-point sum (PIL's `clip8`).
fn clip8(sum: i64) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes `image` to `width` x `height` as PIL's `Image.resize((width, height), Image.LANCZOS)`
/// does for RGB (what A1111's `images.resize_image` uses for its "Lanczos" upscaler): the
/// horizontal pass first, to 8 bits, then the vertical one.
pub fn lanczos(image: &RgbImage, width: usize, height: usize) -> RgbImage {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let half = 1i64 << (PRECISION_BITS - 1);
    let src = image.as_raw();
    let horizontal: Vec<u8> = if width == w {
        src.clone()
    } else {
        let coefficients = lanczos_coefficients(w, width);
        let mut out = vec![0u8; width * h * 3];
        for y in 0..h {
            for (x, (start, weights)) in coefficients.iter().enumerate() {
                for c in 0..3 {
                    let sum: i64 = weights
                        .iter()
                        .enumerate()
                        .map(|(k, &wt)| src[(y * w + start + k) * 3 + c] as i64 * wt)
                        .sum();
                    out[(y * width + x) * 3 + c] = clip8(half + sum);
                }
            }
        }
        out
    };
    let vertical = if height == h {
        horizontal
    } else {
        let coefficients = lanczos_coefficients(h, height);
        let mut out = vec![0u8; width * height * 3];
        for (y, (start, weights)) in coefficients.iter().enumerate() {
            for x in 0..width {
                for c in 0..3 {
                    let sum: i64 = weights
                        .iter()
                        .enumerate()
                        .map(|(k, &wt)| horizontal[((start + k) * width + x) * 3 + c] as i64 * wt)
                        .sum();
                    out[(y * width + x) * 3 + c] = clip8(half + sum);
                }
            }
        }
        out
    };
    RgbImage::from_raw(width as u32, height as u32, vertical).expect("the buffer is width x height x 3")
}
