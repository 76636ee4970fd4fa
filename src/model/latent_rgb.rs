//! A1111's "Approx cheap" live preview: a fixed linear map from the 4 latent channels to R, G, B
//! at latent resolution, no network at all (`modules/sd_vae_approx.py` `cheap_approximation`:
//! `einsum("...lxy,lr -> ...rxy", latent, coeffs)`, no bias). The factors were fitted by a user
//! to SD's VAE (huggingface forum thread "decoding latents to RGB without upscaling") and are
//! A1111's, per family: one table for SD 1.x and 2.x (they share the VAE), one for SDXL.
//!
//! The input is the UNet-space latent (not divided by the VAE's scaling factor); the output is
//! nominally in [-1, 1], like a VAE's.

use candle_core::{DType, Device, Result, Tensor};

/// A latent -> RGB linear map: `rgb[r] = sum_l latent[l] * factors[l][r]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatentRgb {
    /// Rows: latent channels 0..4; columns: R, G, B.
    pub factors: [[f32; 3]; 4],
}

/// A1111's table for SD 1.x and 2.x.
pub const SD_FACTORS: LatentRgb = LatentRgb {
    factors: [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ],
};

/// A1111's table for SDXL (used when `shared.sd_model.is_sdxl`).
pub const SDXL_FACTORS: LatentRgb = LatentRgb {
    factors: [
        [0.3448, 0.4168, 0.4395],
        [-0.1953, -0.0290, 0.0250],
        [0.1074, 0.0886, -0.0163],
        [-0.3730, -0.2499, -0.2088],
    ],
};

/// The latent channels the tables are for.
pub const LATENT_CHANNELS: usize = 4;

impl LatentRgb {
    /// A1111's table for the model: SDXL's when `sdxl`, SD 1.x/2.x's otherwise.
    pub fn for_model(sdxl: bool) -> Self {
        if sdxl {
            SDXL_FACTORS
        } else {
            SD_FACTORS
        }
    }

    /// Latents (b, 4, h, w) -> pictures (b, 3, h, w), f32 on the CPU. The sum runs over the
    /// channels in order, in f32 (what a float32 einsum over 4 terms computes, up to rounding).
    pub fn apply(&self, latents: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = latents.dims4()?;
        if c != LATENT_CHANNELS {
            candle_core::bail!("the approx-cheap preview needs {LATENT_CHANNELS} latent channels, got {c}");
        }
        let values = latents
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let plane = h * w;
        let mut out = vec![0f32; b * 3 * plane];
        for image in 0..b {
            let input = &values[image * c * plane..(image + 1) * c * plane];
            let output = &mut out[image * 3 * plane..(image + 1) * 3 * plane];
            for (rgb, channel_out) in output.chunks_exact_mut(plane).enumerate() {
                for (p, value) in channel_out.iter_mut().enumerate() {
                    let mut sum = 0f32;
                    for (l, row) in self.factors.iter().enumerate() {
                        sum += input[l * plane + p] * row[rgb];
                    }
                    *value = sum;
                }
            }
        }
        Tensor::from_vec(out, (b, 3, h, w), &Device::Cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A latent that is one channel's unit vector gives that channel's row of the table.
    #[test]
    fn unit_latents_give_the_rows() {
        for (l, row) in SD_FACTORS.factors.iter().enumerate() {
            let mut values = vec![0f32; 4];
            values[l] = 1.0;
            let latents = Tensor::from_vec(values, (1, 4, 1, 1), &Device::Cpu).unwrap();
            let rgb = SD_FACTORS
                .apply(&latents)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(rgb, row.to_vec());
        }
    }

    #[test]
    fn other_channel_counts_are_refused() {
        let latents = Tensor::zeros((1, 16, 2, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(SD_FACTORS.apply(&latents).is_err());
    }
}
