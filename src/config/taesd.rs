//! The `config.json` of a TAESD folder, as diffusers' `AutoencoderTiny.__init__` reads it (its
//! defaults), resolved into the decoder's [`TaesdDecoderSpec`].
//!
//! TAESD (madebyollin/taesd, MIT) is a distilled stand-in for SD's VAE, made for previews: the
//! `madebyollin/taesd` (SD 1.x/2.x) and `madebyollin/taesdxl` (SDXL) repos hold it in this layout.
//! Only the decoder is used here. `scaling_factor` (1.0), `latent_magnitude` (3) and
//! `latent_shift` (0.5) are read but play no part in decoding: diffusers' `AutoencoderTiny.decode`
//! takes the UNet-space latents as they are (a pipeline divides them by `scaling_factor`, which is
//! 1), and the magnitude and shift only serve `scale_latents`, TAESD's way of storing latents in
//! an 8-bit picture.

use anyhow::{ensure, Result};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct TaesdConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub encoder_block_out_channels: Vec<usize>,
    pub decoder_block_out_channels: Vec<usize>,
    pub act_fn: String,
    pub upsample_fn: String,
    pub latent_channels: usize,
    pub upsampling_scaling_factor: usize,
    pub num_encoder_blocks: Vec<usize>,
    pub num_decoder_blocks: Vec<usize>,
    pub latent_magnitude: f64,
    pub latent_shift: f64,
    pub scaling_factor: f64,
}

impl Default for TaesdConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            encoder_block_out_channels: vec![64; 4],
            decoder_block_out_channels: vec![64; 4],
            act_fn: "relu".into(),
            upsample_fn: "nearest".into(),
            latent_channels: 4,
            upsampling_scaling_factor: 2,
            num_encoder_blocks: vec![1, 3, 3, 3],
            num_decoder_blocks: vec![3, 3, 3, 1],
            latent_magnitude: 3.0,
            latent_shift: 0.5,
            scaling_factor: 1.0,
        }
    }
}

/// The activation between the convolutions of `DecoderTiny` (diffusers' `get_activation`); the
/// residual blocks' `fuse` is a ReLU whatever this says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaesdActivation {
    Relu,
    /// `silu` or `swish`.
    Silu,
}

/// What the decoder is built from, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaesdDecoderSpec {
    pub latent_channels: usize,
    pub out_channels: usize,
    /// Width of every stage (diffusers chains the stages without a projection, so one width).
    pub channels: usize,
    /// Residual blocks per stage; a nearest upsampling by `upsampling` follows every stage but the
    /// last.
    pub blocks: Vec<usize>,
    pub upsampling: usize,
    pub activation: TaesdActivation,
}

impl TaesdDecoderSpec {
    /// How many times larger the picture is than the latents (8 for TAESD).
    pub fn upscale_factor(&self) -> usize {
        self.upsampling.pow(self.blocks.len().saturating_sub(1) as u32)
    }
}

impl TaesdConfig {
    /// The decoder's spec; an error names the key we cannot honour.
    pub fn decoder(&self) -> Result<TaesdDecoderSpec> {
        let blocks = &self.num_decoder_blocks;
        let widths = &self.decoder_block_out_channels;
        ensure!(!blocks.is_empty(), "num_decoder_blocks is empty");
        ensure!(
            widths.len() == blocks.len(),
            "decoder_block_out_channels has {} entries and num_decoder_blocks {}; they must match (as diffusers \
             requires)",
            widths.len(),
            blocks.len()
        );
        // diffusers' DecoderTiny feeds stage i's output straight into stage i + 1's blocks, which
        // are built at stage i + 1's width: different widths fail there at the first call.
        ensure!(
            widths.iter().all(|&w| w == widths[0] && w > 0),
            "decoder_block_out_channels must be one positive width repeated (diffusers' DecoderTiny joins \
             the stages without a projection), got {widths:?}"
        );
        ensure!(self.latent_channels > 0, "latent_channels must be positive");
        ensure!(self.out_channels > 0, "out_channels must be positive");
        ensure!(
            self.upsampling_scaling_factor > 0,
            "upsampling_scaling_factor must be positive"
        );
        ensure!(
            self.upsample_fn == "nearest",
            "upsample_fn {:?} is not supported (nearest, TAESD's)",
            self.upsample_fn
        );
        let activation = match self.act_fn.as_str() {
            "relu" => TaesdActivation::Relu,
            "silu" | "swish" => TaesdActivation::Silu,
            other => anyhow::bail!("act_fn {other:?} is not supported (relu, TAESD's, or silu)"),
        };
        Ok(TaesdDecoderSpec {
            latent_channels: self.latent_channels,
            out_channels: self.out_channels,
            channels: widths[0],
            blocks: blocks.clone(),
            upsampling: self.upsampling_scaling_factor,
            activation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_taesd() {
        let spec = TaesdConfig::default().decoder().unwrap();
        assert_eq!(spec.channels, 64);
        assert_eq!(spec.blocks, vec![3, 3, 3, 1]);
        assert_eq!(spec.upscale_factor(), 8);
        assert_eq!(spec.activation, TaesdActivation::Relu);
    }

    #[test]
    fn unsupported_keys_are_named() {
        let widths = TaesdConfig {
            decoder_block_out_channels: vec![64, 32, 64, 64],
            ..TaesdConfig::default()
        };
        assert!(format!("{:#}", widths.decoder().unwrap_err()).contains("decoder_block_out_channels"));
        let upsample = TaesdConfig {
            upsample_fn: "bilinear".into(),
            ..TaesdConfig::default()
        };
        assert!(format!("{:#}", upsample.decoder().unwrap_err()).contains("upsample_fn"));
        let act = TaesdConfig {
            act_fn: "mish".into(),
            ..TaesdConfig::default()
        };
        assert!(format!("{:#}", act.decoder().unwrap_err()).contains("act_fn"));
    }
}
