//! The configs of a single file without `--config`: models/arch's SD 1.5 / 2.1 configs (built
//! into the binary) with every size the tensor shapes tell, as diffusers'
//! `create_unet_diffusers_config_from_ldm` and `create_vae_diffusers_config_from_ldm` do from the
//! original yaml. Heads cannot be read from weights: SD 1.x has 8 per transformer, SD 2.x and
//! SDXL 64 channels each (and so do all their CLIP text encoders); a model with other heads needs
//! `--config DIR`.

use anyhow::Result;
use serde_json::{json, Value};

use super::{count_indices, per_block, shape_of, Checkpoint, Family};
use crate::weights::ldm_keys::{self, RenameMap};

const SD1_UNET: &str = include_str!("../../../models/arch/sd1.5/unet/config.json");
const SD1_VAE: &str = include_str!("../../../models/arch/sd1.5/vae/config.json");
const SD1_TEXT: &str = include_str!("../../../models/arch/sd1.5/text_encoder/config.json");
const SD2_UNET: &str = include_str!("../../../models/arch/sd2.1-base/unet/config.json");
const SD2_TEXT: &str = include_str!("../../../models/arch/sd2.1/text_encoder/config.json");

/// SD's attention heads: 8 per transformer in SD 1.x; 64 channels per head in SD 2.x, SDXL and
/// the CLIP text encoders.
const SD1_HEADS: usize = 8;
const HEAD_CHANNELS: usize = 64;
/// SDXL's micro-conditioning: six sizes (original, crop corner, target), each a sinusoid.
const TIME_IDS: usize = 6;
/// SDXL's VAE scale (diffusers' `LDM_VAE_DEFAULT_SCALING_FACTOR` is SD's 0.18215).
const SDXL_VAE_SCALING_FACTOR: f64 = 0.13025;

/// The UNet config: SD 1.5's or SD 2.1's (SDXL: 2.1's with the `text_time` embedding), with every
/// size the shapes tell. `pooled` is SDXL's pooled text width (text_encoder_2's projection).
pub(super) fn unet(
    file: &Checkpoint,
    unet: &RenameMap,
    layout: &ldm_keys::UNetLayout,
    family: Family,
    pooled: Option<usize>,
) -> Result<Value> {
    let mut config: Value = serde_json::from_str(match family {
        Family::Sd1 => SD1_UNET,
        Family::Sd2 | Family::Sdxl => SD2_UNET,
    })?;
    let levels = layout.resnets.len();
    let channels = (0..levels)
        .map(|l| shape_of(file, unet, &format!("down_blocks.{l}.resnets.0.conv1.weight")).map(|s| s[0]))
        .collect::<Result<Vec<_>>>()?;
    let depth: Vec<usize> = (0..levels)
        .map(|l| {
            count_indices(
                unet.keys(),
                &format!("down_blocks.{l}.attentions.0.transformer_blocks."),
            )
            .max(1)
        })
        .collect();
    let cross = unet
        .iter()
        .find(|(name, _)| name.ends_with("attn2.to_k.weight"))
        .and_then(|(_, s)| file.shape(&s.key))
        .map(|s| s[1]);
    let proj_in = unet
        .iter()
        .find(|(name, _)| name.ends_with("proj_in.weight"))
        .and_then(|(_, s)| file.shape(&s.key));
    let down: Vec<&str> = layout
        .attention
        .iter()
        .map(|&a| if a { "CrossAttnDownBlock2D" } else { "DownBlock2D" })
        .collect();
    let up: Vec<&str> = layout
        .attention
        .iter()
        .rev()
        .map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" })
        .collect();
    config["in_channels"] = json!(shape_of(file, unet, "conv_in.weight")?[1]);
    config["out_channels"] = json!(shape_of(file, unet, "conv_out.weight")?[0]);
    config["block_out_channels"] = json!(channels);
    config["layers_per_block"] = per_block(&layout.resnets);
    config["transformer_layers_per_block"] = per_block(&depth);
    config["down_block_types"] = json!(down);
    config["up_block_types"] = json!(up);
    if let Some(cross) = cross {
        config["cross_attention_dim"] = json!(cross);
    }
    if let Some(proj_in) = proj_in {
        config["use_linear_projection"] = json!(proj_in.len() == 2);
    }
    config["attention_head_dim"] = match family {
        Family::Sd1 => json!(SD1_HEADS),
        Family::Sd2 | Family::Sdxl => json!(channels.iter().map(|c| c / HEAD_CHANNELS).collect::<Vec<_>>()),
    };
    if family == Family::Sdxl {
        // `label_emb.0.0` takes the pooled text embedding and the six time-id sinusoids.
        let input = shape_of(file, unet, "add_embedding.linear_1.weight")?[1];
        let pooled = pooled.unwrap_or(0);
        config["addition_embed_type"] = json!("text_time");
        config["addition_time_embed_dim"] = json!(input.saturating_sub(pooled) / TIME_IDS);
        config["projection_class_embeddings_input_dim"] = json!(input);
    }
    Ok(config)
}

/// The VAE config: SD's, with the channels, depth and latent width the shapes tell; SDXL's scale
/// and `force_upcast` (its VAE overflows in f16).
pub(super) fn vae(file: &Checkpoint, vae: &RenameMap, family: Family) -> Result<Value> {
    let mut config: Value = serde_json::from_str(SD1_VAE)?;
    let levels = count_indices(vae.keys(), "decoder.up_blocks.");
    let channels = (0..levels)
        .map(|l| {
            shape_of(
                file,
                vae,
                &format!("decoder.up_blocks.{}.resnets.0.conv2.weight", levels - 1 - l),
            )
            .map(|s| s[0])
        })
        .collect::<Result<Vec<_>>>()?;
    let resnets = count_indices(vae.keys(), "decoder.up_blocks.0.resnets.");
    config["block_out_channels"] = json!(channels);
    config["layers_per_block"] = json!(resnets.saturating_sub(1));
    config["latent_channels"] = json!(shape_of(file, vae, "decoder.conv_in.weight")?[1]);
    config["down_block_types"] = json!(vec!["DownEncoderBlock2D"; levels]);
    config["up_block_types"] = json!(vec!["UpDecoderBlock2D"; levels]);
    if family == Family::Sdxl {
        config["scaling_factor"] = json!(SDXL_VAE_SCALING_FACTOR);
        config["force_upcast"] = json!(true);
    }
    Ok(config)
}

/// Which CLIP a text encoder config starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tower {
    /// OpenAI CLIP-L (SD 1.x, SDXL's first encoder): quick_gelu.
    ClipL,
    /// OpenCLIP (SD 2.x's ViT-H; SDXL's bigG with its projection): gelu.
    OpenClip,
    OpenClipProjected,
}

/// A text encoder config: SD 1.5's CLIP-L or SD 2.1's OpenCLIP-H, with the sizes the shapes tell.
pub(super) fn text_encoder(file: &Checkpoint, text: &RenameMap, tower: Tower) -> Result<Value> {
    let mut config: Value = serde_json::from_str(match tower {
        Tower::ClipL => SD1_TEXT,
        Tower::OpenClip | Tower::OpenClipProjected => SD2_TEXT,
    })?;
    let embedding = shape_of(file, text, "text_model.embeddings.token_embedding.weight")?;
    let positions = shape_of(file, text, "text_model.embeddings.position_embedding.weight")?;
    let fc1 = shape_of(file, text, "text_model.encoder.layers.0.mlp.fc1.weight")?;
    config["vocab_size"] = json!(embedding[0]);
    config["hidden_size"] = json!(embedding[1]);
    config["num_attention_heads"] = json!(embedding[1] / HEAD_CHANNELS);
    config["max_position_embeddings"] = json!(positions[0]);
    config["intermediate_size"] = json!(fc1[0]);
    config["num_hidden_layers"] = json!(count_indices(text.keys(), "text_model.encoder.layers."));
    if tower == Tower::OpenClipProjected {
        // Stored [width, projection] (see `Transform::Transpose`).
        let projection = shape_of(file, text, "text_projection.weight")?;
        config["architectures"] = json!(["CLIPTextModelWithProjection"]);
        config["projection_dim"] = json!(projection.get(1).copied().unwrap_or(embedding[1]));
    }
    Ok(config)
}
