//! The VAE: candle-transformers' `AutoEncoderKL` (it matches diffusers to 3e-6), built from
//! `vae/config.json`; we add the config reading and the `scaling_factor` the pipeline applies.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};

use crate::config::vae::VaeConfig;

pub struct Vae {
    model: AutoEncoderKL,
    scaling_factor: f64,
    downscale_factor: usize,
}

impl Vae {
    /// `config` must have passed [`VaeConfig::validate`].
    pub fn new(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        let kl_config = AutoEncoderKLConfig {
            block_out_channels: config.block_out_channels.clone(),
            layers_per_block: config.layers_per_block,
            latent_channels: config.latent_channels,
            norm_num_groups: config.norm_num_groups,
            use_quant_conv: config.use_quant_conv,
            use_post_quant_conv: config.use_post_quant_conv,
        };
        let model = AutoEncoderKL::new(vb, config.in_channels, config.out_channels, kl_config)?;
        Ok(Self {
            model,
            scaling_factor: config.scaling_factor,
            downscale_factor: config.downscale_factor(),
        })
    }

    /// Image pixels per latent pixel along each side (8 for SD).
    pub fn downscale_factor(&self) -> usize {
        self.downscale_factor
    }

    /// Decodes sampler latents (b, c, h, w), dividing by `scaling_factor` first as diffusers'
    /// pipeline does. Returns images in [-1, 1] (unclamped), (b, 3, h * f, w * f).
    ///
    /// One sample at a time: candle 0.11.1's CPU matmul is wrong for a batched, transposed lhs
    /// times a broadcast rhs (huggingface/candle#3744, fix pending in #3758), which is what its VAE
    /// attention feeds a `Linear`; batch 2 came out 5% off diffusers, each sample alone within
    /// 1.3e-6. Pinned by `tests/models.rs::vae_decode_of_a_batch_of_two_matches_diffusers`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let scaled = (latents / self.scaling_factor)?;
        let images = (0..scaled.dim(0)?)
            .map(|i| self.model.decode(&scaled.narrow(0, i, 1)?))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&images, 0)
    }
}
