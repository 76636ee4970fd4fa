//! Live previews: a picture of the denoising so far, every N steps, without the VAE. What the
//! CLI's `--preview FILE.png` rewrites and the server's `/sdapi/v1/progress` returns as
//! `current_image`.
//!
//! As A1111 (`modules/sd_samplers_common.py`, `shared_state.py`):
//! - The picture is of the step's x0 estimate, not of the noisy latents.
//! - Two ways to draw it: [`PreviewMethod::ApproxCheap`], A1111's "Approx cheap" linear map
//!   ([`LatentRgb`], at latent resolution: A1111 shows it at that size, the page scales it), and
//!   [`PreviewMethod::Taesd`], TAESD's decoder ([`TaesdDecoder`], 8x the latent size).
//! - To 8-bit as A1111's `single_sample_to_image`: `clamp(x * 0.5 + 0.5, 0, 1) * 255`, truncated
//!   (not rounded, unlike the final picture).
//! - A batch is shown as a grid (A1111's "Show previews of all images generated in a batch as a
//!   grid", on by default): `round(sqrt(n))` rows, black where a row is short.
//!
//! Where we depart: A1111's default `live_preview_content` is "Prompt", the x0 of the prompt's
//! branch alone; sdfix previews the x0 of the CFG-combined prediction (A1111's "Combined"), the
//! one the sampler steps with, which the one denoising loop already hands to every observer
//! ([`StepInfo::x0`]). The two converge as sampling ends.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

use super::Engine;
use crate::model::latent_rgb::{self, LatentRgb};
use crate::model::taesd::TaesdDecoder;
use crate::pipeline::StepInfo;
use crate::weights::taesd::TaesdFolder;

/// `--preview-every` unless told, for approx-cheap: every step. It costs 0.02 ms at 512 px against
/// seconds per UNet step on a CPU (docs/performance.md), and a preview that moves every 10 steps
/// is a still picture on a slow machine.
pub const DEFAULT_PREVIEW_EVERY: usize = 1;
/// `--preview-every` unless told, for TAESD: A1111's `show_progress_every_n_steps` default. A
/// TAESD decode at 512 px is about 141 GFLOP (6% of the VAE's) and took seconds on 2 CPU cores
/// (docs/performance.md), a sizeable part of a UNet step there: every step would slow a CPU run
/// that much.
pub const DEFAULT_TAESD_PREVIEW_EVERY: usize = 10;

/// How a preview is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreviewMethod {
    /// A1111's "Approx cheap": a linear latent -> RGB map, at latent resolution.
    ApproxCheap,
    /// TAESD's decoder (`--taesd DIR`), at full resolution.
    Taesd,
}

impl PreviewMethod {
    pub fn name(self) -> &'static str {
        match self {
            Self::ApproxCheap => "approx-cheap",
            Self::Taesd => "taesd",
        }
    }
}

impl std::str::FromStr for PreviewMethod {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "approx-cheap" => Ok(Self::ApproxCheap),
            "taesd" => Ok(Self::Taesd),
            other => Err(format!("unknown preview method {other:?} (approx-cheap or taesd)")),
        }
    }
}

/// What a front-end asks previews to be, resolved from its flags.
#[derive(Debug, Clone)]
pub struct PreviewSettings {
    /// The TAESD folder, for [`PreviewMethod::Taesd`]; `None` draws approx-cheap.
    pub taesd: Option<TaesdFolder>,
    /// A preview every this many steps (at least 1), and at the last step.
    pub every: usize,
}

impl PreviewSettings {
    pub fn method(&self) -> PreviewMethod {
        match self.taesd {
            Some(_) => PreviewMethod::Taesd,
            None => PreviewMethod::ApproxCheap,
        }
    }
}

/// One preview picture, row-major 8-bit RGB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviewImage {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

enum Drawer {
    Approx(LatentRgb),
    Taesd { decoder: TaesdDecoder, dtype: DType },
}

/// Draws previews for one model ([`Engine::previewer`]).
pub struct Previewer {
    drawer: Drawer,
    every: usize,
    method: PreviewMethod,
}

impl std::fmt::Debug for Previewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Previewer")
            .field("method", &self.method)
            .field("every", &self.every)
            .finish()
    }
}

impl Engine {
    /// A previewer for this model, checked against it: approx-cheap needs the 4 latent channels
    /// of SD's VAE; a TAESD must take the model's latent channels (its decoder is read here, onto
    /// the engine's device). Returns warnings beside it: a TAESD folder named for SDXL on
    /// another model, or the other way round (the weights cannot tell; A1111 picks by name too).
    pub fn previewer(&self, settings: &PreviewSettings) -> Result<(Previewer, Vec<String>)> {
        let channels = self.configs.vae.latent_channels;
        let sdxl = self.configs.unet.text_time.is_some();
        let mut warnings = Vec::new();
        let drawer = match &settings.taesd {
            None => {
                if channels != latent_rgb::LATENT_CHANNELS {
                    bail!(
                        "--preview-method approx-cheap needs a model with {} latent channels, this one has {channels}; \
                         pass --taesd DIR with a TAESD made for it",
                        latent_rgb::LATENT_CHANNELS
                    );
                }
                Drawer::Approx(LatentRgb::for_model(sdxl))
            }
            Some(folder) => {
                let label = folder.path.display();
                if folder.spec.latent_channels != channels {
                    bail!(
                        "--taesd {label}: it decodes {} latent channels, this model has {channels} (TAESD for SD 1.x/2.x \
                         is madebyollin/taesd, for SDXL madebyollin/taesdxl)",
                        folder.spec.latent_channels
                    );
                }
                let named_xl = folder.named_for_sdxl();
                if named_xl && !sdxl {
                    warnings.push(format!(
                        "warning: --taesd {label} looks like SDXL's TAESD (taesdxl) but the model is not SDXL; previews \
                         will have wrong colours (use madebyollin/taesd)"
                    ));
                } else if sdxl && !named_xl {
                    warnings.push(format!(
                        "warning: the model is SDXL; if --taesd {label} is not SDXL's TAESD (madebyollin/taesdxl), \
                         previews will have wrong colours"
                    ));
                }
                // The engine's dtype: f32 on the CPU (our kernels), the UNet's on a GPU.
                let dtype = self.dtype;
                Drawer::Taesd {
                    decoder: folder.load_decoder(&self.device, dtype)?,
                    dtype,
                }
            }
        };
        Ok((
            Previewer {
                drawer,
                every: settings.every.max(1),
                method: settings.method(),
            },
            warnings,
        ))
    }
}

impl Previewer {
    pub fn method(&self) -> PreviewMethod {
        self.method
    }

    pub fn every(&self) -> usize {
        self.every
    }

    /// Whether step `step` gets a preview: every `every` steps (1-based: steps N, 2N, ...) and
    /// the last step, so a file left behind shows where sampling ended.
    pub fn due(&self, step: &StepInfo) -> bool {
        (step.index + 1).is_multiple_of(self.every) || step.index + 1 == step.steps
    }

    /// The preview of x0 estimates (b, c, h, w): one picture, a grid for b > 1.
    pub fn render(&self, x0: &Tensor) -> Result<PreviewImage> {
        let pictures = match &self.drawer {
            Drawer::Approx(factors) => factors.apply(x0)?,
            Drawer::Taesd { decoder, dtype } => decoder.decode(&x0.to_dtype(*dtype)?)?,
        };
        let pictures = pictures.to_device(&candle_core::Device::Cpu)?.to_dtype(DType::F32)?;
        let (b, c, h, w) = pictures.dims4()?;
        if c != 3 {
            bail!("a preview needs 3 output channels, the decoder gives {c}");
        }
        let values = pictures.flatten_all()?.to_vec1::<f32>()?;
        let plane = h * w;
        let images: Vec<Vec<u8>> = values
            .chunks_exact(3 * plane)
            .map(|image| to_rgb8_truncated(image, plane))
            .collect();
        debug_assert_eq!(images.len(), b);
        Ok(grid(&images, w, h))
    }
}

/// One picture (3, h, w) in [-1, 1] to row-major 8-bit RGB as A1111's `single_sample_to_image`:
/// `clamp(x * 0.5 + 0.5, 0, 1) * 255` in f32, then truncated to an integer (numpy's
/// `astype(np.uint8)`).
pub fn to_rgb8_truncated(image: &[f32], plane: usize) -> Vec<u8> {
    let mut rgb = vec![0u8; 3 * plane];
    for p in 0..plane {
        for c in 0..3 {
            let x = (image[c * plane + p] * 0.5 + 0.5).clamp(0.0, 1.0);
            // In [0, 255]: the cast truncates, as numpy's does.
            rgb[p * 3 + c] = (255.0 * x) as u8;
        }
    }
    rgb
}

/// A1111's `images.image_grid` with its defaults (`n_rows` -1): `round(sqrt(n))` rows,
/// `ceil(n / rows)` columns, image i at column `i % cols`, row `i / cols`, black elsewhere.
pub fn grid(images: &[Vec<u8>], width: usize, height: usize) -> PreviewImage {
    let n = images.len().max(1);
    let rows = ((n as f64).sqrt().round() as usize).clamp(1, n);
    let cols = n.div_ceil(rows);
    let grid_width = cols * width;
    let mut rgb = vec![0u8; grid_width * rows * height * 3];
    for (i, image) in images.iter().enumerate() {
        let (x0, y0) = ((i % cols) * width, (i / cols) * height);
        for y in 0..height {
            let from = &image[y * width * 3..(y + 1) * width * 3];
            let start = ((y0 + y) * grid_width + x0) * 3;
            rgb[start..start + width * 3].copy_from_slice(from);
        }
    }
    PreviewImage {
        width: grid_width,
        height: rows * height,
        rgb,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_follow_a1111_rows() {
        // n -> (rows, cols): round(sqrt(n)) rows.
        for (n, rows, cols) in [
            (1, 1, 1),
            (2, 1, 2),
            (3, 2, 2),
            (4, 2, 2),
            (5, 2, 3),
            (6, 2, 3),
            (7, 3, 3),
        ] {
            let images: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8 + 1; 2 * 3]).collect();
            let g = grid(&images, 2, 1);
            assert_eq!((g.height, g.width), (rows, cols * 2), "n = {n}");
            // Image i sits at column i % cols, row i / cols.
            for i in 0..n {
                let at = ((i / cols) * g.width + (i % cols) * 2) * 3;
                assert_eq!(g.rgb[at], i as u8 + 1, "n = {n}, image {i}");
            }
        }
    }

    #[test]
    fn eight_bit_truncates_as_numpy() {
        // 0.999 -> 0.9995 * 255 = 254.87 -> 254 (rounding would give 255); out of range clamps.
        let rgb = to_rgb8_truncated(&[0.999, -2.0, 2.0], 1);
        assert_eq!(rgb, vec![254, 0, 255]);
    }

    #[test]
    fn methods_parse() {
        assert_eq!("taesd".parse::<PreviewMethod>(), Ok(PreviewMethod::Taesd));
        assert_eq!("approx-cheap".parse::<PreviewMethod>(), Ok(PreviewMethod::ApproxCheap));
        assert!("full".parse::<PreviewMethod>().is_err());
    }
}
