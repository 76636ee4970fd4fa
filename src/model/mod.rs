//! Models: finding their files, reading their configs, building the networks from thin layers.
//!
//! - [`files`]: a local diffusers-layout folder or a Hugging Face repo.
//! - [`demo`]: the two tiny demo models built into the binary.
//! - [`weights`]: safetensors / PyTorch `.bin` loading with every tensor name and shape checked;
//!   [`safetensors_reader`]: safetensors read into our own buffers, not mapped.
//! - [`unet`], [`clip`]: our UNet2DConditionModel and CLIP text transformer on candle-nn.
//! - [`vae`]: the VAE decoder, configured from vae/config.json.
//! - [`tokenizer`]: CLIP BPE, ids equal to transformers' CLIPTokenizer.
//! - [`resnet`]: the resnet, down- and upsampling blocks the UNet and the VAE share.
//! - The thin layers the networks are built from: [`attention`] (the one attention function all
//!   of them use), [`conv`], [`norm`], [`linear`] and [`activation`] (GELU/GEGLU). Each decides
//!   which kernel runs (ours from [`crate::kernels`] for f32 on the CPU, candle's ops elsewhere)
//!   and times the call with [`crate::kernels::profile`]; none holds kernel code.

pub mod activation;
pub mod attention;
pub mod clip;
pub mod conv;
pub mod demo;
pub mod files;
pub mod linear;
pub mod norm;
pub mod resnet;
pub mod safetensors_reader;
pub mod stable_diffusion;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device};

use crate::config::clip::ClipTextConfig;
use crate::config::read_json;
use crate::config::unet::UNetConfig;
use crate::config::vae::VaeConfig;

use self::clip::ClipTextTransformer;
use self::unet::UNet2DConditionModel;
use self::vae::Vae;
use self::weights::Weights;

/// Builds the UNet from its config.json and weights file.
pub fn load_unet(config: &Path, weights: &Path, dtype: DType, device: &Device) -> Result<UNet2DConditionModel> {
    let spec = read_json::<UNetConfig>(config)?
        .resolve()
        .with_context(|| format!("{}", config.display()))?;
    Weights::open(weights, dtype, device)?.build(|vb| Ok(UNet2DConditionModel::new(vb, &spec)?))
}

/// Builds the CLIP text transformer from its config.json and weights file.
pub fn load_text_encoder(config: &Path, weights: &Path, dtype: DType, device: &Device) -> Result<ClipTextTransformer> {
    let config_values: ClipTextConfig = read_json(config)?;
    config_values
        .validate()
        .with_context(|| format!("{}", config.display()))?;
    Weights::open(weights, dtype, device)?.build(|vb| ClipTextTransformer::new(vb, &config_values))
}

/// Builds the VAE decoder from its config.json and weights file (the encoder's tensors are not
/// read).
pub fn load_vae(config: &Path, weights: &Path, dtype: DType, device: &Device) -> Result<Vae> {
    let config_values: VaeConfig = read_json(config)?;
    config_values
        .validate()
        .with_context(|| format!("{}", config.display()))?;
    build_vae(weights, &config_values, dtype, device)
}

/// The VAE decoder from a validated config and its weights file; the encoder's tensors are
/// deliberately not read ([`Vae::UNREAD_PREFIXES`]).
pub fn build_vae(weights: &Path, config: &VaeConfig, dtype: DType, device: &Device) -> Result<Vae> {
    Weights::open(weights, dtype, device)?.build_part(Vae::UNREAD_PREFIXES, |vb| Ok(Vae::new(vb, config)?))
}
