//! `vae/config.json`, as diffusers' `AutoencoderKL.__init__` reads it (its defaults).

use anyhow::{ensure, Result};
use serde::Deserialize;
use serde_json::Value;

/// `sample_size` as diffusers' `AutoencoderKL` takes it: one side, or a list of sides.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum SampleSize {
    Side(usize),
    Sides(Vec<usize>),
}

impl SampleSize {
    /// The side diffusers derives the latent tile from: the value, or a list's first entry
    /// (`AutoencoderKL.__init__`).
    pub fn first(&self) -> Option<usize> {
        match self {
            Self::Side(side) => Some(*side),
            Self::Sides(sides) => sides.first().copied(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    /// The image side the VAE was trained at: tiled decoding's tile size
    /// ([`crate::model::vae_tiling`]). An int in SD's configs; diffusers also takes a list.
    pub sample_size: SampleSize,
    /// Latents are divided by this before decoding (0.18215 for SD 1.x/2.x).
    pub scaling_factor: f64,
    pub shift_factor: Option<Value>,
    pub latents_mean: Option<Value>,
    pub latents_std: Option<Value>,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
    /// Decode in f32 when the model runs in f16 (diffusers' pipelines honour it); `None` when
    /// the file does not say (diffusers' default then: true, see [`Self::force_upcast`]).
    pub force_upcast: Option<bool>,
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: SampleSize::Side(32),
            scaling_factor: 0.18215,
            shift_factor: None,
            latents_mean: None,
            latents_std: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            force_upcast: None,
        }
    }
}

impl VaeConfig {
    /// diffusers' `force_upcast`: the file's value, true when it does not say.
    pub fn force_upcast(&self) -> bool {
        self.force_upcast.unwrap_or(true)
    }

    /// Whether the file itself says `force_upcast: true`: SDXL's VAE configs do (and our
    /// single-file reader writes it for SDXL), SD 1.x/2.x's on the hub predate the key. Lever 6
    /// (`SDFIX_CUDA_VAE_BF16`) keeps such a VAE in f32.
    pub fn force_upcast_stated(&self) -> bool {
        self.force_upcast == Some(true)
    }

    /// The factor between image and latent size: 2 per down block but the last (8 for SD).
    pub fn downscale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// Rejects what our decoder (src/model/vae.rs) does not implement.
    pub fn validate(&self) -> Result<()> {
        let blocks = self.block_out_channels.len();
        ensure!(blocks > 0, "block_out_channels is empty");
        ensure!(
            self.down_block_types.len() == blocks && self.down_block_types.iter().all(|t| t == "DownEncoderBlock2D"),
            "down_block_types must be {blocks} x DownEncoderBlock2D, got {:?}",
            self.down_block_types
        );
        ensure!(
            self.up_block_types.len() == blocks && self.up_block_types.iter().all(|t| t == "UpDecoderBlock2D"),
            "up_block_types must be {blocks} x UpDecoderBlock2D, got {:?}",
            self.up_block_types
        );
        ensure!(
            self.act_fn == "silu",
            "act_fn {:?} is not supported (silu)",
            self.act_fn
        );
        ensure!(
            self.mid_block_add_attention,
            "mid_block_add_attention = false is not supported"
        );
        for (key, value) in [
            ("shift_factor", &self.shift_factor),
            ("latents_mean", &self.latents_mean),
            ("latents_std", &self.latents_std),
        ] {
            ensure!(
                value.as_ref().is_none_or(Value::is_null),
                "{key} is not supported (SD 1.x/2.x VAEs leave it null)"
            );
        }
        ensure!(
            self.scaling_factor > 0.0,
            "scaling_factor must be positive, got {}",
            self.scaling_factor
        );
        for &c in &self.block_out_channels {
            ensure!(
                self.norm_num_groups > 0 && c.is_multiple_of(self.norm_num_groups),
                "block_out_channels {c} is not divisible by norm_num_groups {}",
                self.norm_num_groups
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// diffusers' default applies when the file is silent, but only a file that says
    /// `force_upcast: true` (SDXL's) counts as stated, for lever 6.
    #[test]
    fn force_upcast_default_and_stated() {
        let silent: VaeConfig = serde_json::from_str("{}").unwrap();
        assert!(silent.force_upcast() && !silent.force_upcast_stated());
        let stated: VaeConfig = serde_json::from_str(r#"{"force_upcast": true}"#).unwrap();
        assert!(stated.force_upcast() && stated.force_upcast_stated());
        let off: VaeConfig = serde_json::from_str(r#"{"force_upcast": false}"#).unwrap();
        assert!(!off.force_upcast() && !off.force_upcast_stated());
        let sdxl: VaeConfig = serde_json::from_str(include_str!("../../models/arch/sdxl/vae/config.json")).unwrap();
        assert!(sdxl.force_upcast_stated());
        let sd21: VaeConfig =
            serde_json::from_str(include_str!("../../models/arch/sd2.1-base/vae/config.json")).unwrap();
        assert!(sd21.force_upcast() && !sd21.force_upcast_stated());
    }
}
