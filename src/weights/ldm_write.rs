//! The reverse of [`super::ldm_keys`]: diffusers names written in the original LDM / SAI layout,
//! as A1111, ComfyUI and civitai files keep SDXL (diffusers' `convert_diffusers_to_original_sdxl.py`
//! script does the same in Python). Used by `sdfix convert FOLDER --out FILE.safetensors`
//! ([`super::convert::write_sdxl`]) and by the LoRA reader, whose kohya SDXL files name UNet modules in this
//! layout (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`).
//!
//! The layout comes from the diffusers names themselves (levels, resnets per level, which blocks
//! have attentions and samplers), so any UNet depth maps; [`super::ldm_keys::unet_renames`] on
//! the written keys gives back the names it started from (tested in `tests/singlefile_sdxl.rs`).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

use super::ldm_keys::SDXL_OPEN_CLIP_PREFIX;

/// A diffusers UNet's block structure, read from its tensor (or module) names.
#[derive(Debug, Clone, Default)]
pub struct UNetBlocks {
    /// (level, resnet) -> input block index; level -> its downsampler's input block index.
    input: HashMap<(usize, usize), usize>,
    downsampler: HashMap<usize, usize>,
    /// (up block, resnet) -> output block index; up block -> (output block, part) of its upsampler.
    output: HashMap<(usize, usize), usize>,
    upsampler: HashMap<usize, (usize, usize)>,
}

/// Distinct `N` of `prefix N.` among `names`.
pub fn indices<'a>(names: impl Iterator<Item = &'a str>, prefix: &str) -> BTreeSet<usize> {
    names
        .filter_map(|n| n.strip_prefix(prefix))
        .filter_map(|rest| rest.split('.').next()?.parse().ok())
        .collect()
}

impl UNetBlocks {
    /// The blocks of the UNet whose names (diffusers, with or without `.weight`) are `names`.
    pub fn from_names<'a>(names: impl Iterator<Item = &'a str> + Clone) -> Self {
        let mut blocks = Self::default();
        let has = |prefix: &str| names.clone().any(|n| n.starts_with(prefix));
        let levels = indices(names.clone(), "down_blocks.").len();
        let mut k = 1;
        for level in 0..levels {
            for j in indices(names.clone(), &format!("down_blocks.{level}.resnets.")) {
                blocks.input.insert((level, j), k);
                k += 1;
            }
            if has(&format!("down_blocks.{level}.downsamplers.")) {
                blocks.downsampler.insert(level, k);
                k += 1;
            }
        }
        let mut k = 0;
        for up in 0..indices(names.clone(), "up_blocks.").len() {
            let resnets = indices(names.clone(), &format!("up_blocks.{up}.resnets."));
            for &j in &resnets {
                blocks.output.insert((up, j), k);
                k += 1;
            }
            if has(&format!("up_blocks.{up}.upsamplers.")) {
                // LDM puts the upsampler after the block's last resnet (and its attention).
                let part = if has(&format!("up_blocks.{up}.attentions.")) {
                    2
                } else {
                    1
                };
                blocks.upsampler.insert(up, (k.saturating_sub(1), part));
            }
        }
        blocks
    }

    /// The LDM name (under [`UNET_PREFIX`], without it) of diffusers UNet name or module path
    /// `name`; `None` for a name no rule knows.
    pub fn ldm_name(&self, name: &str) -> Option<String> {
        for (ours, ldm) in [
            ("time_embedding.linear_1", "time_embed.0"),
            ("time_embedding.linear_2", "time_embed.2"),
            ("add_embedding.linear_1", "label_emb.0.0"),
            ("add_embedding.linear_2", "label_emb.0.2"),
            ("conv_in", "input_blocks.0.0"),
            ("conv_norm_out", "out.0"),
            ("conv_out", "out.2"),
        ] {
            if let Some(tail) = name.strip_prefix(ours).filter(|t| t.is_empty() || t.starts_with('.')) {
                return Some(format!("{ldm}{tail}"));
            }
        }
        let (block, rest) = split_two(name)?;
        let (kind, rest) = rest.split_once('.')?;
        if let Some(level) = block.strip_prefix("down_blocks.") {
            let level: usize = level.parse().ok()?;
            return match kind {
                "resnets" | "attentions" => {
                    let (j, tail) = index(rest)?;
                    let k = self.input.get(&(level, j))?;
                    Some(block_part(&format!("input_blocks.{k}"), kind, tail))
                }
                "downsamplers" => {
                    let tail = rest.strip_prefix("0.conv")?;
                    Some(format!("input_blocks.{}.0.op{tail}", self.downsampler.get(&level)?))
                }
                _ => None,
            };
        }
        if let Some(up) = block.strip_prefix("up_blocks.") {
            let up: usize = up.parse().ok()?;
            return match kind {
                "resnets" | "attentions" => {
                    let (j, tail) = index(rest)?;
                    let k = self.output.get(&(up, j))?;
                    Some(block_part(&format!("output_blocks.{k}"), kind, tail))
                }
                "upsamplers" => {
                    let tail = rest.strip_prefix("0.conv")?;
                    let (k, part) = self.upsampler.get(&up)?;
                    Some(format!("output_blocks.{k}.{part}.conv{tail}"))
                }
                _ => None,
            };
        }
        if block == "mid_block" {
            let (j, tail) = index(rest)?;
            return match (kind, j) {
                ("resnets", 0) => Some(format!("middle_block.0{}", resnet_ldm(tail))),
                ("attentions", 0) => Some(format!("middle_block.1{tail}")),
                ("resnets", 1) => Some(format!("middle_block.2{}", resnet_ldm(tail))),
                _ => None,
            };
        }
        None
    }
}

/// `down_blocks.1.rest` -> ("down_blocks.1", "rest"); `mid_block.rest` -> ("mid_block", "rest").
fn split_two(name: &str) -> Option<(&str, &str)> {
    if let Some(rest) = name.strip_prefix("mid_block.") {
        return Some(("mid_block", rest));
    }
    let first = name.find('.')?;
    let second = first + 1 + name[first + 1..].find('.')?;
    Some((&name[..second], &name[second + 1..]))
}

/// `3.rest` -> (3, ".rest"); `3` -> (3, "").
fn index(rest: &str) -> Option<(usize, &str)> {
    match rest.split_once('.') {
        Some((j, _)) => Some((j.parse().ok()?, &rest[j.len()..])),
        None => Some((rest.parse().ok()?, "")),
    }
}

fn block_part(block: &str, kind: &str, tail: &str) -> String {
    match kind {
        "resnets" => format!("{block}.0{}", resnet_ldm(tail)),
        _ => format!("{block}.1{tail}"),
    }
}

/// A resnet's diffusers suffix (`.norm1.weight`) in LDM's names (`.in_layers.0.weight`).
fn resnet_ldm(tail: &str) -> String {
    for (ours, ldm) in [
        (".norm1", ".in_layers.0"),
        (".conv1", ".in_layers.2"),
        (".time_emb_proj", ".emb_layers.1"),
        (".norm2", ".out_layers.0"),
        (".conv2", ".out_layers.3"),
        (".conv_shortcut", ".skip_connection"),
    ] {
        if let Some(rest) = tail.strip_prefix(ours).filter(|t| t.is_empty() || t.starts_with('.')) {
            return format!("{ldm}{rest}");
        }
    }
    tail.to_string()
}

/// A VAE tensor's LDM name (`convert_ldm_vae_checkpoint` read backwards); `levels` is the
/// decoder's up-block count (its blocks are numbered in reverse).
pub fn vae_ldm_name(name: &str, levels: usize) -> Option<String> {
    let vae_resnet = |tail: &str| tail.replacen("conv_shortcut.", "nin_shortcut.", 1);
    if name.starts_with("quant_conv.") || name.starts_with("post_quant_conv.") {
        return Some(name.to_string());
    }
    let (part, rest) = name.split_once('.')?;
    if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        return Some(name.to_string());
    }
    if let Some(tail) = rest.strip_prefix("conv_norm_out.") {
        return Some(format!("{part}.norm_out.{tail}"));
    }
    if let Some(mid) = rest.strip_prefix("mid_block.") {
        if let Some(tail) = mid.strip_prefix("resnets.0.") {
            return Some(format!("{part}.mid.block_1.{}", vae_resnet(tail)));
        }
        if let Some(tail) = mid.strip_prefix("resnets.1.") {
            return Some(format!("{part}.mid.block_2.{}", vae_resnet(tail)));
        }
        let attention = mid.strip_prefix("attentions.0.")?;
        for (ours, ldm) in [
            ("group_norm.", "norm."),
            ("to_q.", "q."),
            ("to_k.", "k."),
            ("to_v.", "v."),
            ("to_out.0.", "proj_out."),
        ] {
            if let Some(tail) = attention.strip_prefix(ours) {
                return Some(format!("{part}.mid.attn_1.{ldm}{tail}"));
            }
        }
        return None;
    }
    let (blocks, ldm_blocks, sampler, ldm_sampler) = match part {
        "encoder" => ("down_blocks.", "down", "downsamplers.0.", "downsample."),
        "decoder" => ("up_blocks.", "up", "upsamplers.0.", "upsample."),
        _ => return None,
    };
    let (level, rest) = rest.strip_prefix(blocks)?.split_once('.')?;
    let mut level: usize = level.parse().ok()?;
    if part == "decoder" {
        level = levels.checked_sub(level + 1)?;
    }
    if let Some(tail) = rest.strip_prefix(sampler) {
        return Some(format!("{part}.{ldm_blocks}.{level}.{ldm_sampler}{tail}"));
    }
    let (j, tail) = rest.strip_prefix("resnets.")?.split_once('.')?;
    Some(format!("{part}.{ldm_blocks}.{level}.block.{j}.{}", vae_resnet(tail)))
}

/// An HF CLIP text model name without its `text_model.` level.
pub fn bare(name: &str) -> &str {
    name.strip_prefix("text_model.").unwrap_or(name)
}

/// text_encoder_2 (HF `CLIPTextModelWithProjection`) in OpenCLIP's names
/// (`convert_open_clip_checkpoint` read backwards): q, k, v fused into `in_proj`, the projection
/// stored [width, projection].
pub fn open_clip_tensors(tensors: &HashMap<String, Tensor>, label: &str) -> Result<Vec<(String, Tensor)>> {
    let get = |name: &str| -> Result<&Tensor> {
        tensors
            .get(name)
            .or_else(|| tensors.get(&format!("text_model.{name}")))
            .with_context(|| format!("{label}: text_encoder_2 has no {name}"))
    };
    let mut out = Vec::new();
    let mut fused: BTreeMap<(usize, &str), [Option<Tensor>; 3]> = BTreeMap::new();
    for (name, tensor) in tensors {
        let rest = bare(name);
        let ldm = match rest {
            "embeddings.token_embedding.weight" => "token_embedding.weight".to_string(),
            "embeddings.position_embedding.weight" => "positional_embedding".to_string(),
            "embeddings.position_ids" => continue,
            "text_projection.weight" => {
                out.push((
                    format!("{SDXL_OPEN_CLIP_PREFIX}text_projection"),
                    tensor.t()?.contiguous()?,
                ));
                continue;
            }
            _ => {
                if let Some(tail) = rest.strip_prefix("final_layer_norm.") {
                    format!("ln_final.{tail}")
                } else if let Some(layer) = rest.strip_prefix("encoder.layers.") {
                    let (n, tail) = layer.split_once('.').context("a layer name without its field")?;
                    let n: usize = n.parse().with_context(|| format!("{label}: {name}"))?;
                    let projection = ["q_proj.", "k_proj.", "v_proj."]
                        .iter()
                        .position(|p| tail.starts_with(&format!("self_attn.{p}")));
                    if let Some(k) = projection {
                        let kind = if tail.ends_with(".weight") { "weight" } else { "bias" };
                        fused.entry((n, kind)).or_default()[k] = Some(tensor.clone());
                        continue;
                    }
                    let mapped = [
                        ("layer_norm1.", "ln_1."),
                        ("layer_norm2.", "ln_2."),
                        ("mlp.fc1.", "mlp.c_fc."),
                        ("mlp.fc2.", "mlp.c_proj."),
                        ("self_attn.out_proj.", "attn.out_proj."),
                    ]
                    .iter()
                    .find_map(|(ours, ldm)| tail.strip_prefix(ours).map(|t| format!("{ldm}{t}")))
                    .with_context(|| format!("{label}: text_encoder_2 tensor {name} has no OpenCLIP name"))?;
                    format!("transformer.resblocks.{n}.{mapped}")
                } else {
                    bail!("{label}: text_encoder_2 tensor {name} has no OpenCLIP name");
                }
            }
        };
        out.push((format!("{SDXL_OPEN_CLIP_PREFIX}{ldm}"), tensor.clone()));
    }
    get("final_layer_norm.weight")?;
    for ((n, kind), parts) in fused {
        let parts = parts
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .with_context(|| format!("{label}: text_encoder_2 layer {n} lacks one of q/k/v_proj.{kind}"))?;
        out.push((
            format!("{SDXL_OPEN_CLIP_PREFIX}transformer.resblocks.{n}.attn.in_proj_{kind}"),
            Tensor::cat(&parts, 0)?,
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdxl_blocks_get_sai_numbers() {
        let names = [
            "down_blocks.0.resnets.0.conv1.weight",
            "down_blocks.0.resnets.1.conv1.weight",
            "down_blocks.0.downsamplers.0.conv.weight",
            "down_blocks.1.resnets.0.norm1.weight",
            "down_blocks.1.resnets.1.conv1.weight",
            "down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q.weight",
            "down_blocks.1.downsamplers.0.conv.weight",
            "down_blocks.2.resnets.0.conv1.weight",
            "down_blocks.2.resnets.1.conv1.weight",
            "up_blocks.0.resnets.0.conv1.weight",
            "up_blocks.0.resnets.1.conv1.weight",
            "up_blocks.0.resnets.2.conv_shortcut.weight",
            "up_blocks.0.attentions.2.proj_out.weight",
            "up_blocks.0.upsamplers.0.conv.weight",
            "up_blocks.2.resnets.2.conv1.weight",
            "up_blocks.1.resnets.0.conv1.weight",
            "up_blocks.1.resnets.1.conv1.weight",
            "up_blocks.1.resnets.2.conv1.weight",
            "up_blocks.2.resnets.0.conv1.weight",
            "up_blocks.2.resnets.1.conv1.weight",
            "up_blocks.1.upsamplers.0.conv.weight",
        ];
        let blocks = UNetBlocks::from_names(names.iter().copied());
        for (ours, ldm) in [
            ("down_blocks.0.downsamplers.0.conv.weight", "input_blocks.3.0.op.weight"),
            (
                "down_blocks.1.resnets.0.norm1.weight",
                "input_blocks.4.0.in_layers.0.weight",
            ),
            (
                "down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q",
                "input_blocks.5.1.transformer_blocks.0.attn1.to_q",
            ),
            (
                "up_blocks.0.attentions.2.proj_out.weight",
                "output_blocks.2.1.proj_out.weight",
            ),
            ("up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.2.conv.weight"),
            (
                "up_blocks.0.resnets.2.conv_shortcut.weight",
                "output_blocks.2.0.skip_connection.weight",
            ),
            (
                "up_blocks.2.resnets.2.conv1.weight",
                "output_blocks.8.0.in_layers.2.weight",
            ),
            ("mid_block.attentions.0.proj_in.weight", "middle_block.1.proj_in.weight"),
            (
                "mid_block.resnets.1.time_emb_proj.bias",
                "middle_block.2.emb_layers.1.bias",
            ),
            ("add_embedding.linear_2.weight", "label_emb.0.2.weight"),
        ] {
            assert_eq!(blocks.ldm_name(ours).as_deref(), Some(ldm), "{ours}");
        }
    }

    #[test]
    fn vae_names_reverse_the_decoder() {
        assert_eq!(
            vae_ldm_name("decoder.up_blocks.0.resnets.1.conv_shortcut.weight", 4).as_deref(),
            Some("decoder.up.3.block.1.nin_shortcut.weight")
        );
        assert_eq!(
            vae_ldm_name("encoder.mid_block.attentions.0.to_out.0.bias", 4).as_deref(),
            Some("encoder.mid.attn_1.proj_out.bias")
        );
    }
}
