//! The original LDM checkpoint layout (CompVis `ldm`, Stability `stablediffusion`, as AUTOMATIC1111,
//! ComfyUI and model hubs share single files) renamed to the diffusers keys our modules read.
//! Each rename is computed from the checkpoint's own keys, so the depth of every block comes from
//! the file; the tables follow diffusers' `single_file_utils.py`
//! (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_open_clip_checkpoint`).
//!
//! | LDM key (under `model.diffusion_model.`) | diffusers key (UNet) |
//! | --- | --- |
//! | `time_embed.0`, `time_embed.2` | `time_embedding.linear_1`, `linear_2` |
//! | `input_blocks.0.0` | `conv_in` |
//! | `input_blocks.K.0` (ResBlock), `.1` (SpatialTransformer) | `down_blocks.L.resnets.J`, `attentions.J` |
//! | `input_blocks.K.0.op` | `down_blocks.L.downsamplers.0.conv` |
//! | `middle_block.0`, `.1`, `.2` | `mid_block.resnets.0`, `attentions.0`, `resnets.1` |
//! | `output_blocks.K.0`, `.1` | `up_blocks.I.resnets.J`, `attentions.J` |
//! | `output_blocks.K.1.conv` or `.2.conv` | `up_blocks.I.upsamplers.0.conv` |
//! | `out.0`, `out.2` | `conv_norm_out`, `conv_out` |
//! | ResBlock `in_layers.0/.2`, `emb_layers.1`, `out_layers.0/.3`, `skip_connection` | `norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`, `conv_shortcut` |
//!
//! Input blocks are walked in order: a block with `.0.op` closes a level, so each level's
//! resnet count (diffusers' `layers_per_block`) is counted, not assumed; up block `I` holds level
//! `levels - 1 - I`'s count plus one.
//!
//! | LDM key (under `first_stage_model.`) | diffusers key (VAE) |
//! | --- | --- |
//! | `encoder.down.L.block.J`, `.downsample.conv` | `encoder.down_blocks.L.resnets.J`, `.downsamplers.0.conv` |
//! | `decoder.up.L.block.J`, `.upsample.conv` | `decoder.up_blocks.(n-1-L).resnets.J`, `.upsamplers.0.conv` (numbered in reverse) |
//! | `*.mid.block_1`, `block_2` | `*.mid_block.resnets.0`, `resnets.1` |
//! | `*.mid.attn_1.norm`, `q`, `k`, `v`, `proj_out` | `*.mid_block.attentions.0.group_norm`, `to_q`, `to_k`, `to_v`, `to_out.0` (1x1 convs as linear) |
//! | `*.norm_out`, resnet `nin_shortcut` | `*.conv_norm_out`, `conv_shortcut` |
//!
//! | LDM key | diffusers key (text encoder) |
//! | --- | --- |
//! | `cond_stage_model.transformer.[text_model.]X` (SD 1.x, CLIP-L) | `text_model.X` |
//! | `cond_stage_model.model.token_embedding`, `positional_embedding`, `ln_final` (SD 2.x, OpenCLIP) | `text_model.embeddings.token_embedding`, `position_embedding`, `final_layer_norm` |
//! | `...transformer.resblocks.N.ln_1`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`, `attn.out_proj` | `text_model.encoder.layers.N.layer_norm1`, `layer_norm2`, `mlp.fc1`, `mlp.fc2`, `self_attn.out_proj` |
//! | `...attn.in_proj_weight` / `_bias` ([3d, d]) | `self_attn.q_proj`, `k_proj`, `v_proj` (thirds, in that order) |

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Result};

/// The UNet's keys in an LDM checkpoint start with this.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
/// The UNet's EMA copy: the same keys with the dots removed (`model_ema.diffusion_modelout0weight`).
pub const UNET_EMA_PREFIX: &str = "model_ema.diffusion_model";
pub const VAE_PREFIX: &str = "first_stage_model.";
/// SD 1.x: transformers' CLIPTextModel, with or without its `text_model.` level.
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
/// SD 2.x: OpenCLIP ViT-H's text tower.
pub const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
/// SDXL's first text encoder (CLIP-L, transformers' names under it).
pub const SDXL_CLIP_PREFIX: &str = "conditioner.embedders.0.transformer.";
/// SDXL's second text encoder (OpenCLIP bigG, OpenCLIP's names under it).
pub const SDXL_OPEN_CLIP_PREFIX: &str = "conditioner.embedders.1.model.";

/// How a tensor is changed on its way from the checkpoint to the module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    Same,
    /// A 1x1 convolution's [out, in, 1, 1] weight used as a linear layer's [out, in].
    ConvToLinear,
    /// Part `k` of 3 along dim 0 (OpenCLIP's fused q/k/v projection).
    Third(usize),
    /// OpenCLIP's `text_projection`, stored [width, projection] for `x @ P`: transposed to the
    /// linear layer's [projection, width] (`convert_open_clip_checkpoint`).
    Transpose,
}

/// Where one diffusers tensor comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub key: String,
    pub transform: Transform,
}

impl Source {
    fn same(key: &str) -> Self {
        Self {
            key: key.to_string(),
            transform: Transform::Same,
        }
    }
}

/// diffusers name -> checkpoint source, for one component.
pub type RenameMap = BTreeMap<String, Source>;

/// A ResBlock's LDM suffixes and their diffusers names.
const RESNET_RENAMES: &[(&str, &str)] = &[
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
];

fn resnet_suffix(rest: &str) -> Option<String> {
    RESNET_RENAMES
        .iter()
        .find_map(|(ldm, ours)| rest.strip_prefix(ldm).map(|tail| format!("{ours}{tail}")))
}

/// `input_blocks.12.0.rest` -> (12, 0, "rest").
fn split_block(key: &str) -> Option<(usize, usize, &str)> {
    let (index, rest) = key.split_once('.')?;
    let (part, rest) = rest.split_once('.')?;
    Some((index.parse().ok()?, part.parse().ok()?, rest))
}

/// What the UNet's keys say about its shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UNetLayout {
    /// Resnets per level (diffusers' `layers_per_block`, per down block).
    pub resnets: Vec<usize>,
    /// Whether each level's down block has attentions (`CrossAttnDownBlock2D`).
    pub attention: Vec<bool>,
}

/// Input block index -> (level, resnet index), the resnet index `None` for a downsampler.
type InputRoles = BTreeMap<usize, (usize, Option<usize>)>;

/// What each input block of an LDM UNet is.
fn input_block_roles(keys: &BTreeSet<&str>) -> Result<(InputRoles, UNetLayout)> {
    let mut indices: BTreeSet<usize> = BTreeSet::new();
    for key in keys {
        if let Some((k, _, _)) = key.strip_prefix("input_blocks.").and_then(split_block) {
            indices.insert(k);
        }
    }
    let mut roles = BTreeMap::new();
    let mut layout = UNetLayout {
        resnets: vec![0],
        attention: vec![false],
    };
    for &k in indices.iter().filter(|&&k| k > 0) {
        let level = layout.resnets.len() - 1;
        if keys.contains(format!("input_blocks.{k}.0.op.weight").as_str()) {
            roles.insert(k, (level, None));
            layout.resnets.push(0);
            layout.attention.push(false);
        } else {
            roles.insert(k, (level, Some(layout.resnets[level])));
            layout.resnets[level] += 1;
            if keys.iter().any(|key| key.starts_with(&format!("input_blocks.{k}.1."))) {
                layout.attention[level] = true;
            }
        }
    }
    if layout.resnets.contains(&0) {
        bail!("the UNet's input_blocks do not form levels of resnets and downsamplers");
    }
    Ok((roles, layout))
}

/// The UNet's renames, from the keys under [`UNET_PREFIX`] (given without it). Keys that fit no
/// rule are returned apart.
pub fn unet_renames(keys: &BTreeSet<&str>) -> Result<(BTreeMap<String, String>, UNetLayout, Vec<String>)> {
    let (roles, layout) = input_block_roles(keys)?;
    let levels = layout.resnets.len();
    // Output block K -> (up block, resnet index): up block I has level (levels-1-I)'s count + 1.
    let mut output_roles = Vec::new();
    for up in 0..levels {
        for j in 0..=layout.resnets[levels - 1 - up] {
            output_roles.push((up, j));
        }
    }
    let mut renames = BTreeMap::new();
    let mut unknown = Vec::new();
    for &key in keys {
        let ours = unet_key(key, &roles, &output_roles, levels);
        match ours {
            Some(ours) => {
                renames.insert(ours, key.to_string());
            }
            None => unknown.push(key.to_string()),
        }
    }
    Ok((renames, layout, unknown))
}

fn unet_key(key: &str, roles: &InputRoles, output_roles: &[(usize, usize)], levels: usize) -> Option<String> {
    for (ldm, ours) in [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
        // SDXL: the pooled-text and micro-conditioning embedding.
        ("label_emb.0.0.", "add_embedding.linear_1."),
        ("label_emb.0.2.", "add_embedding.linear_2."),
    ] {
        if let Some(tail) = key.strip_prefix(ldm) {
            return Some(format!("{ours}{tail}"));
        }
    }
    if let Some(rest) = key.strip_prefix("input_blocks.") {
        let (k, part, rest) = split_block(rest)?;
        let &(level, resnet) = roles.get(&k)?;
        return match (resnet, part) {
            (None, 0) => rest
                .strip_prefix("op.")
                .map(|tail| format!("down_blocks.{level}.downsamplers.0.conv.{tail}")),
            (Some(j), 0) => resnet_suffix(rest).map(|s| format!("down_blocks.{level}.resnets.{j}.{s}")),
            (Some(j), 1) => Some(format!("down_blocks.{level}.attentions.{j}.{rest}")),
            _ => None,
        };
    }
    if let Some(rest) = key.strip_prefix("middle_block.") {
        let (part, rest) = rest.split_once('.')?;
        return match part {
            "0" => resnet_suffix(rest).map(|s| format!("mid_block.resnets.0.{s}")),
            "1" => Some(format!("mid_block.attentions.0.{rest}")),
            "2" => resnet_suffix(rest).map(|s| format!("mid_block.resnets.1.{s}")),
            _ => None,
        };
    }
    if let Some(rest) = key.strip_prefix("output_blocks.") {
        let (k, part, rest) = split_block(rest)?;
        let &(up, j) = output_roles.get(k)?;
        let upsampler = |rest: &str| {
            rest.strip_prefix("conv.")
                .filter(|_| up + 1 < levels)
                .map(|tail| format!("up_blocks.{up}.upsamplers.0.conv.{tail}"))
        };
        return match part {
            0 => resnet_suffix(rest).map(|s| format!("up_blocks.{up}.resnets.{j}.{s}")),
            1 if rest.starts_with("conv.") => upsampler(rest),
            1 => Some(format!("up_blocks.{up}.attentions.{j}.{rest}")),
            2 => upsampler(rest),
            _ => None,
        };
    }
    None
}

/// The VAE's renames (keys given without [`VAE_PREFIX`]); mid-block attention weights stored as
/// 1x1 convolutions are marked to be reshaped. Returns the renames and the unknown keys.
pub fn vae_renames(keys: &BTreeSet<&str>, shape: impl Fn(&str) -> Option<Vec<usize>>) -> (RenameMap, Vec<String>) {
    let decoder_levels = keys
        .iter()
        .filter_map(|k| k.strip_prefix("decoder.up.").and_then(|r| r.split_once('.')))
        .filter_map(|(level, _)| level.parse::<usize>().ok())
        .max()
        .map_or(0, |m| m + 1);
    let mut renames = RenameMap::new();
    let mut unknown = Vec::new();
    for &key in keys {
        match vae_key(key, decoder_levels) {
            Some(ours) => {
                let attention_weight = ours.contains("mid_block.attentions.0.to_") && ours.ends_with(".weight");
                let transform = if attention_weight && shape(key).is_some_and(|s| s.len() == 4) {
                    Transform::ConvToLinear
                } else {
                    Transform::Same
                };
                renames.insert(
                    ours,
                    Source {
                        key: format!("{VAE_PREFIX}{key}"),
                        transform,
                    },
                );
            }
            None => unknown.push(format!("{VAE_PREFIX}{key}")),
        }
    }
    (renames, unknown)
}

fn vae_resnet(rest: &str) -> String {
    match rest.strip_prefix("nin_shortcut.") {
        Some(tail) => format!("conv_shortcut.{tail}"),
        None => rest.to_string(),
    }
}

fn vae_key(key: &str, decoder_levels: usize) -> Option<String> {
    for same in ["quant_conv.", "post_quant_conv."] {
        if key.starts_with(same) {
            return Some(key.to_string());
        }
    }
    let (part, rest) = key.split_once('.')?;
    if part != "encoder" && part != "decoder" {
        return None;
    }
    for same in ["conv_in.", "conv_out."] {
        if rest.starts_with(same) {
            return Some(key.to_string());
        }
    }
    if let Some(tail) = rest.strip_prefix("norm_out.") {
        return Some(format!("{part}.conv_norm_out.{tail}"));
    }
    if let Some(mid) = rest.strip_prefix("mid.") {
        if let Some(tail) = mid.strip_prefix("block_1.") {
            return Some(format!("{part}.mid_block.resnets.0.{}", vae_resnet(tail)));
        }
        if let Some(tail) = mid.strip_prefix("block_2.") {
            return Some(format!("{part}.mid_block.resnets.1.{}", vae_resnet(tail)));
        }
        let attention = mid.strip_prefix("attn_1.")?;
        let (name, tail) = attention.split_once('.')?;
        let ours = match name {
            "norm" => "group_norm",
            "q" => "to_q",
            "k" => "to_k",
            "v" => "to_v",
            "proj_out" => "to_out.0",
            _ => return None,
        };
        return Some(format!("{part}.mid_block.attentions.0.{ours}.{tail}"));
    }
    let (blocks, sample) = if part == "encoder" {
        ("down.", "downsample.")
    } else {
        ("up.", "upsample.")
    };
    let (level, rest) = rest.strip_prefix(blocks)?.split_once('.')?;
    let level: usize = level.parse().ok()?;
    let (ours_blocks, ours_sample, level) = if part == "encoder" {
        ("down_blocks", "downsamplers", level)
    } else {
        ("up_blocks", "upsamplers", decoder_levels.checked_sub(level + 1)?)
    };
    if let Some(tail) = rest.strip_prefix(sample) {
        return Some(format!("{part}.{ours_blocks}.{level}.{ours_sample}.0.{tail}"));
    }
    let (j, tail) = rest.strip_prefix("block.")?.split_once('.')?;
    let j: usize = j.parse().ok()?;
    Some(format!("{part}.{ours_blocks}.{level}.resnets.{j}.{}", vae_resnet(tail)))
}

/// CLIP-L renames (keys given without `prefix`: [`CLIP_PREFIX`] for SD 1.x,
/// [`SDXL_CLIP_PREFIX`] for SDXL's first encoder).
pub fn clip_renames(keys: &BTreeSet<&str>, prefix: &str) -> (RenameMap, Vec<String>) {
    let mut renames = RenameMap::new();
    let mut unknown = Vec::new();
    for &key in keys {
        if key.ends_with("position_ids") {
            continue;
        }
        let ours = if key.starts_with("text_model.") {
            key.to_string()
        } else if key.starts_with("embeddings.") || key.starts_with("encoder.") || key.starts_with("final_layer_norm.")
        {
            format!("text_model.{key}")
        } else {
            unknown.push(format!("{prefix}{key}"));
            continue;
        };
        renames.insert(ours, Source::same(&format!("{prefix}{key}")));
    }
    (renames, unknown)
}

/// Which OpenCLIP text tower: SD 2.x's ViT-H or SDXL's bigG.
#[derive(Debug, Clone, Copy)]
pub struct OpenClip<'a> {
    /// [`OPEN_CLIP_PREFIX`] or [`SDXL_OPEN_CLIP_PREFIX`].
    pub prefix: &'a str,
    /// Resblocks from this one on are dropped: SD 2 conditions on the penultimate layer, so its
    /// diffusers config has one layer fewer than the checkpoint; SDXL keeps them all (its pooled
    /// output is the last layer's).
    pub layers: usize,
    /// Keep `text_projection` (SDXL's `CLIPTextModelWithProjection`; SD 2 does not use it).
    pub projection: bool,
}

/// OpenCLIP renames (keys given without `tower.prefix`), as diffusers'
/// `convert_open_clip_checkpoint`. Returns the renames, the dropped keys, and the unknown keys.
pub fn open_clip_renames(keys: &BTreeSet<&str>, tower: OpenClip) -> (RenameMap, Vec<String>, Vec<String>) {
    let mut renames = RenameMap::new();
    let mut dropped = Vec::new();
    let mut unknown = Vec::new();
    let layers = tower.layers;
    let full = |key: &str| format!("{}{key}", tower.prefix);
    for &key in keys {
        let ours = match key {
            "token_embedding.weight" => "text_model.embeddings.token_embedding.weight".to_string(),
            "positional_embedding" => "text_model.embeddings.position_embedding.weight".to_string(),
            "text_projection" if tower.projection => {
                renames.insert(
                    "text_projection.weight".into(),
                    Source {
                        key: full(key),
                        transform: Transform::Transpose,
                    },
                );
                continue;
            }
            "text_projection" | "logit_scale" | "attn_mask" => continue,
            _ => {
                if let Some(tail) = key.strip_prefix("ln_final.") {
                    format!("text_model.final_layer_norm.{tail}")
                } else if let Some(rest) = key.strip_prefix("transformer.resblocks.") {
                    let Some((n, rest)) = rest.split_once('.') else {
                        unknown.push(full(key));
                        continue;
                    };
                    let Ok(n) = n.parse::<usize>() else {
                        unknown.push(full(key));
                        continue;
                    };
                    if n >= layers {
                        dropped.push(full(key));
                        continue;
                    }
                    let layer = format!("text_model.encoder.layers.{n}");
                    if let Some(kind) = rest.strip_prefix("attn.in_proj_") {
                        for (k, proj) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                            renames.insert(
                                format!("{layer}.self_attn.{proj}.{kind}"),
                                Source {
                                    key: full(key),
                                    transform: Transform::Third(k),
                                },
                            );
                        }
                        continue;
                    }
                    let mapped = [
                        ("ln_1.", "layer_norm1."),
                        ("ln_2.", "layer_norm2."),
                        ("mlp.c_fc.", "mlp.fc1."),
                        ("mlp.c_proj.", "mlp.fc2."),
                        ("attn.out_proj.", "self_attn.out_proj."),
                    ]
                    .iter()
                    .find_map(|(ldm, ours)| rest.strip_prefix(ldm).map(|tail| format!("{layer}.{ours}{tail}")));
                    match mapped {
                        Some(ours) => ours,
                        None => {
                            unknown.push(full(key));
                            continue;
                        }
                    }
                } else {
                    unknown.push(full(key));
                    continue;
                }
            }
        };
        renames.insert(ours, Source::same(&full(key)));
    }
    (renames, dropped, unknown)
}

/// Keys LDM checkpoints carry that no module reads: the training schedule's buffers, the
/// training-time loss, markers read elsewhere ([`super::single_file`]).
pub fn is_junk(key: &str) -> bool {
    const EXACT: &[&str] = &[
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
        "lvlb_weights",
        "v_pred",
        "ztsnr",
    ];
    EXACT.contains(&key)
        || key.ends_with("position_ids")
        || key.ends_with("logit_scale")
        || key.starts_with("first_stage_model.loss.")
        || key.starts_with("model_ema.")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SD 1.x's input and output blocks (2 resnets per level, 4 levels, no attention in the last).
    #[test]
    fn sd_unet_blocks_land_where_diffusers_puts_them() {
        let mut keys = vec!["input_blocks.0.0.weight".to_string(), "out.2.weight".to_string()];
        for k in [1, 2, 4, 5, 7, 8, 10, 11] {
            keys.push(format!("input_blocks.{k}.0.in_layers.0.weight"));
            if k < 10 {
                keys.push(format!("input_blocks.{k}.1.proj_in.weight"));
            }
        }
        for k in [3, 6, 9] {
            keys.push(format!("input_blocks.{k}.0.op.weight"));
        }
        for k in 0..12 {
            keys.push(format!("output_blocks.{k}.0.skip_connection.weight"));
            if k >= 3 {
                keys.push(format!("output_blocks.{k}.1.proj_out.weight"));
            }
        }
        keys.push("output_blocks.2.1.conv.weight".into());
        keys.push("output_blocks.5.2.conv.weight".into());
        keys.push("middle_block.1.norm.weight".into());
        keys.push("middle_block.2.out_layers.3.bias".into());
        let set: BTreeSet<&str> = keys.iter().map(String::as_str).collect();
        let (renames, layout, unknown) = unet_renames(&set).unwrap();
        assert!(unknown.is_empty(), "{unknown:?}");
        assert_eq!(layout.resnets, vec![2, 2, 2, 2]);
        assert_eq!(layout.attention, vec![true, true, true, false]);
        for (ours, ldm) in [
            ("conv_in.weight", "input_blocks.0.0.weight"),
            (
                "down_blocks.1.resnets.1.norm1.weight",
                "input_blocks.5.0.in_layers.0.weight",
            ),
            ("down_blocks.2.downsamplers.0.conv.weight", "input_blocks.9.0.op.weight"),
            (
                "down_blocks.3.resnets.0.norm1.weight",
                "input_blocks.10.0.in_layers.0.weight",
            ),
            ("up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.1.conv.weight"),
            ("up_blocks.1.upsamplers.0.conv.weight", "output_blocks.5.2.conv.weight"),
            (
                "up_blocks.1.attentions.0.proj_out.weight",
                "output_blocks.3.1.proj_out.weight",
            ),
            (
                "up_blocks.3.resnets.2.conv_shortcut.weight",
                "output_blocks.11.0.skip_connection.weight",
            ),
            ("mid_block.attentions.0.norm.weight", "middle_block.1.norm.weight"),
            ("mid_block.resnets.1.conv2.bias", "middle_block.2.out_layers.3.bias"),
            ("conv_out.weight", "out.2.weight"),
        ] {
            assert_eq!(renames.get(ours).map(String::as_str), Some(ldm), "{ours}");
        }
    }

    #[test]
    fn vae_decoder_levels_are_reversed_and_attention_convs_become_linear() {
        let keys: BTreeSet<&str> = [
            "decoder.up.0.block.0.nin_shortcut.weight",
            "decoder.up.1.upsample.conv.weight",
            "decoder.mid.attn_1.q.weight",
            "decoder.mid.attn_1.q.bias",
            "encoder.down.0.downsample.conv.weight",
            "encoder.norm_out.bias",
            "post_quant_conv.weight",
            "loss.logvar",
        ]
        .into();
        let (renames, unknown) = vae_renames(&keys, |k| k.ends_with("q.weight").then(|| vec![4, 4, 1, 1]));
        assert_eq!(unknown, vec!["first_stage_model.loss.logvar"]);
        let get = |k: &str| renames.get(k).cloned().unwrap();
        assert_eq!(
            get("decoder.up_blocks.1.resnets.0.conv_shortcut.weight").key,
            "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"
        );
        assert_eq!(
            get("decoder.up_blocks.0.upsamplers.0.conv.weight").key,
            "first_stage_model.decoder.up.1.upsample.conv.weight"
        );
        assert_eq!(
            get("decoder.mid_block.attentions.0.to_q.weight").transform,
            Transform::ConvToLinear
        );
        assert_eq!(
            get("decoder.mid_block.attentions.0.to_q.bias").transform,
            Transform::Same
        );
        assert!(renames.contains_key("encoder.down_blocks.0.downsamplers.0.conv.weight"));
        assert!(renames.contains_key("encoder.conv_norm_out.bias"));
    }

    #[test]
    fn open_clip_splits_qkv_and_drops_the_last_layer() {
        let keys: BTreeSet<&str> = [
            "transformer.resblocks.0.attn.in_proj_weight",
            "transformer.resblocks.1.ln_1.weight",
            "positional_embedding",
            "ln_final.bias",
            "logit_scale",
        ]
        .into();
        let tower = OpenClip {
            prefix: OPEN_CLIP_PREFIX,
            layers: 1,
            projection: false,
        };
        let (renames, dropped, unknown) = open_clip_renames(&keys, tower);
        assert!(unknown.is_empty());
        assert_eq!(
            dropped,
            vec!["cond_stage_model.model.transformer.resblocks.1.ln_1.weight"]
        );
        assert_eq!(
            renames["text_model.encoder.layers.0.self_attn.v_proj.weight"].transform,
            Transform::Third(2)
        );
        assert!(renames.contains_key("text_model.embeddings.position_embedding.weight"));
        assert!(renames.contains_key("text_model.final_layer_norm.bias"));
    }
}
