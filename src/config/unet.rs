//! `unet/config.json`, as diffusers' `UNet2DConditionModel.__init__` reads it, and its resolution
//! into per-block settings.
//!
//! diffusers' naming quirk: when `num_attention_heads` is null, `attention_head_dim` holds the
//! number of heads ([5, 10, 20, 20] for SD 2.x, 8 for SD 1.x), and each transformer's head size is
//! its channels divided by that.

use anyhow::{bail, ensure, Result};
use serde::Deserialize;
use serde_json::Value;

/// A config value that may be given once for every block or once per block.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// One value per block, checking the count of a per-block list.
    pub fn expand(&self, blocks: usize, key: &str) -> Result<Vec<T>> {
        match self {
            Self::One(value) => Ok(vec![value.clone(); blocks]),
            Self::Many(values) if values.len() == blocks => Ok(values.clone()),
            Self::Many(values) => bail!("{key} has {} values but there are {blocks} down blocks", values.len()),
        }
    }
}

/// The keys of `UNet2DConditionModel.__init__`, with its defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct UNetConfig {
    pub sample_size: Option<usize>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub only_cross_attention: PerBlock<bool>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: PerBlock<usize>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub act_fn: String,
    pub norm_num_groups: Option<usize>,
    pub norm_eps: f64,
    pub cross_attention_dim: PerBlock<usize>,
    pub transformer_layers_per_block: PerBlock<usize>,
    pub reverse_transformer_layers_per_block: Option<Value>,
    pub attention_head_dim: PerBlock<usize>,
    pub num_attention_heads: Option<PerBlock<usize>>,
    pub dual_cross_attention: bool,
    pub use_linear_projection: bool,
    /// SDXL's config has `null` here, which diffusers reads as false.
    pub upcast_attention: Option<bool>,
    pub resnet_time_scale_shift: String,
    pub resnet_out_scale_factor: f64,
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<usize>,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub attention_type: String,
    // Keys whose only supported value is their default (null or false); see `unsupported`.
    pub encoder_hid_dim: Option<Value>,
    pub class_embed_type: Option<Value>,
    /// `"text_time"` (SDXL) is supported; see [`TextTimeSpec`].
    pub addition_embed_type: Option<Value>,
    pub addition_time_embed_dim: Option<usize>,
    pub projection_class_embeddings_input_dim: Option<usize>,
    pub num_class_embeds: Option<Value>,
    pub time_embedding_act_fn: Option<Value>,
    pub timestep_post_act: Option<Value>,
    pub time_cond_proj_dim: Option<Value>,
    pub cross_attention_norm: Option<Value>,
    pub class_embeddings_concat: bool,
    pub mid_block_only_cross_attention: Option<bool>,
}

impl Default for UNetConfig {
    fn default() -> Self {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Self {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: strings(&[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: strings(&[
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]),
            only_cross_attention: PerBlock::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".into(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::One(1280),
            transformer_layers_per_block: PerBlock::One(1),
            reverse_transformer_layers_per_block: None,
            attention_head_dim: PerBlock::One(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            upcast_attention: None,
            resnet_time_scale_shift: "default".into(),
            resnet_out_scale_factor: 1.0,
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            attention_type: "default".into(),
            encoder_hid_dim: None,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            projection_class_embeddings_input_dim: None,
            num_class_embeds: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            cross_attention_norm: None,
            class_embeddings_concat: false,
            mid_block_only_cross_attention: None,
        }
    }
}

/// Whether a block has transformer (cross-attention) layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    CrossAttention,
    Plain,
}

/// The transformer layers of one block.
#[derive(Debug, Clone, PartialEq)]
pub struct TransformerSpec {
    pub heads: usize,
    pub layers: usize,
    pub cross_attention_dim: usize,
    /// diffusers' `only_cross_attention`: the first attention also attends to the text.
    pub only_cross_attention: bool,
}

/// One down or up block.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockSpec {
    pub out_channels: usize,
    /// Resnet layers (for up blocks, `layers_per_block + 1`, as in diffusers).
    pub layers: usize,
    /// `None` for DownBlock2D / UpBlock2D.
    pub transformer: Option<TransformerSpec>,
}

/// SDXL's added conditioning (`addition_embed_type = "text_time"`): the micro-conditioning values
/// (original size, crop corner, target size) each as a sinusoid of `time_embed_dim`
/// (`add_time_proj`), concatenated after the pooled text embedding, then `add_embedding`'s MLP
/// from `input_dim` to the time embedding's width, added to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextTimeSpec {
    pub time_embed_dim: usize,
    pub input_dim: usize,
}

impl TextTimeSpec {
    /// The micro-conditioning values: original (h, w), crop (top, left), target (h, w).
    pub const TIME_IDS: usize = 6;

    /// The width of the pooled text embedding this UNet expects.
    pub fn pooled_dim(&self) -> usize {
        self.input_dim - Self::TIME_IDS * self.time_embed_dim
    }
}

/// A validated UNet configuration: everything the modules need, per block.
#[derive(Debug, Clone, PartialEq)]
pub struct UNetSpec {
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub time_embed_dim: usize,
    pub block_out_channels: Vec<usize>,
    pub down_blocks: Vec<BlockSpec>,
    pub mid_transformer: TransformerSpec,
    pub up_blocks: Vec<BlockSpec>,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub resnet_out_scale_factor: f64,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub sample_size: Option<usize>,
    /// SDXL's added text/time conditioning, when the config asks for it.
    pub text_time: Option<TextTimeSpec>,
}

impl UNetSpec {
    /// How many times the UNet halves the latent size.
    pub fn downsamples(&self) -> usize {
        self.down_blocks.len().saturating_sub(1)
    }
}

impl UNetConfig {
    /// Keys set to something these modules do not implement; each is an error naming the key.
    fn unsupported(&self) -> Vec<String> {
        let mut found = Vec::new();
        let mut check = |key: &str, set: bool, value: String| {
            if set {
                found.push(format!("{key} = {value}"));
            }
        };
        let not_null = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null());
        let show = |v: &Option<Value>| v.as_ref().map_or("null".to_string(), Value::to_string);
        check(
            "encoder_hid_dim",
            not_null(&self.encoder_hid_dim),
            show(&self.encoder_hid_dim),
        );
        check(
            "class_embed_type",
            not_null(&self.class_embed_type),
            show(&self.class_embed_type),
        );
        check(
            "addition_embed_type",
            not_null(&self.addition_embed_type) && self.addition_embed_type != Some(Value::from("text_time")),
            show(&self.addition_embed_type),
        );
        check(
            "num_class_embeds",
            not_null(&self.num_class_embeds),
            show(&self.num_class_embeds),
        );
        check(
            "time_embedding_act_fn",
            not_null(&self.time_embedding_act_fn),
            show(&self.time_embedding_act_fn),
        );
        check(
            "timestep_post_act",
            not_null(&self.timestep_post_act),
            show(&self.timestep_post_act),
        );
        check(
            "time_cond_proj_dim",
            not_null(&self.time_cond_proj_dim),
            show(&self.time_cond_proj_dim),
        );
        check(
            "cross_attention_norm",
            not_null(&self.cross_attention_norm),
            show(&self.cross_attention_norm),
        );
        check(
            "reverse_transformer_layers_per_block",
            not_null(&self.reverse_transformer_layers_per_block),
            show(&self.reverse_transformer_layers_per_block),
        );
        check("class_embeddings_concat", self.class_embeddings_concat, "true".into());
        check("dual_cross_attention", self.dual_cross_attention, "true".into());
        check("act_fn", self.act_fn != "silu", format!("{:?}", self.act_fn));
        check(
            "resnet_time_scale_shift",
            self.resnet_time_scale_shift != "default",
            format!("{:?}", self.resnet_time_scale_shift),
        );
        check(
            "time_embedding_type",
            self.time_embedding_type != "positional",
            format!("{:?}", self.time_embedding_type),
        );
        check(
            "attention_type",
            self.attention_type != "default",
            format!("{:?}", self.attention_type),
        );
        check("norm_num_groups", self.norm_num_groups.is_none(), "null".into());
        check(
            "mid_block_type",
            self.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn"),
            format!("{:?}", self.mid_block_type),
        );
        found
    }

    /// `addition_embed_type = "text_time"`'s sizes, both required (diffusers fails without them).
    fn text_time(&self) -> Result<Option<TextTimeSpec>> {
        if self.addition_embed_type != Some(Value::from("text_time")) {
            return Ok(None);
        }
        let (Some(time_embed_dim), Some(input_dim)) =
            (self.addition_time_embed_dim, self.projection_class_embeddings_input_dim)
        else {
            bail!(
                "addition_embed_type \"text_time\" needs addition_time_embed_dim and projection_class_embeddings_input_dim"
            );
        };
        ensure!(
            time_embed_dim > 0 && input_dim > TextTimeSpec::TIME_IDS * time_embed_dim,
            "projection_class_embeddings_input_dim {input_dim} must exceed 6 x addition_time_embed_dim {time_embed_dim} (the pooled text embedding is the rest)"
        );
        Ok(Some(TextTimeSpec {
            time_embed_dim,
            input_dim,
        }))
    }

    /// Validates the config and works out each block's settings as diffusers does.
    pub fn resolve(&self) -> Result<UNetSpec> {
        let unsupported = self.unsupported();
        ensure!(
            unsupported.is_empty(),
            "unsupported UNet config: {}",
            unsupported.join(", ")
        );
        let blocks = self.down_block_types.len();
        ensure!(blocks > 0, "down_block_types is empty");
        ensure!(
            self.up_block_types.len() == blocks && self.block_out_channels.len() == blocks,
            "down_block_types ({blocks}), up_block_types ({}) and block_out_channels ({}) must have the same length",
            self.up_block_types.len(),
            self.block_out_channels.len()
        );
        for (key, k) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            ensure!(k % 2 == 1, "{key} = {k}: only odd kernel sizes keep the latent size");
        }
        let norm_num_groups = self.norm_num_groups.unwrap_or_default();
        for &c in &self.block_out_channels {
            ensure!(
                norm_num_groups > 0 && c.is_multiple_of(norm_num_groups),
                "block_out_channels {c} is not divisible by norm_num_groups {norm_num_groups}"
            );
        }
        let layers = self.layers_per_block.expand(blocks, "layers_per_block")?;
        let transformer_layers = self
            .transformer_layers_per_block
            .expand(blocks, "transformer_layers_per_block")?;
        let cross_dims = self.cross_attention_dim.expand(blocks, "cross_attention_dim")?;
        let only_cross = self.only_cross_attention.expand(blocks, "only_cross_attention")?;
        // diffusers: `num_attention_heads = num_attention_heads or attention_head_dim`.
        let heads = self
            .num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .expand(
                blocks,
                if self.num_attention_heads.is_some() {
                    "num_attention_heads"
                } else {
                    "attention_head_dim"
                },
            )?;
        if self.mid_block_only_cross_attention == Some(true) {
            bail!("mid_block_only_cross_attention = true: UNetMidBlock2DCrossAttn has no such option");
        }

        let kind = |name: &str, cross: &str, plain: &str| -> Result<BlockKind> {
            match name {
                n if n == cross => Ok(BlockKind::CrossAttention),
                n if n == plain => Ok(BlockKind::Plain),
                other => bail!("block type {other:?} is not supported (expected {cross} or {plain})"),
            }
        };
        let transformer = |i: usize, channels: usize| -> Result<TransformerSpec> {
            ensure!(
                heads[i] > 0 && channels.is_multiple_of(heads[i]),
                "block {i}: {channels} channels are not divisible by {} attention heads",
                heads[i]
            );
            Ok(TransformerSpec {
                heads: heads[i],
                layers: transformer_layers[i],
                cross_attention_dim: cross_dims[i],
                only_cross_attention: only_cross[i],
            })
        };

        let mut down_blocks = Vec::with_capacity(blocks);
        for (i, name) in self.down_block_types.iter().enumerate() {
            let out_channels = self.block_out_channels[i];
            let transformer = match kind(name, "CrossAttnDownBlock2D", "DownBlock2D")? {
                BlockKind::CrossAttention => Some(transformer(i, out_channels)?),
                BlockKind::Plain => None,
            };
            down_blocks.push(BlockSpec {
                out_channels,
                layers: layers[i],
                transformer,
            });
        }
        // Up blocks read every per-block list reversed.
        let mut up_blocks = Vec::with_capacity(blocks);
        for (i, name) in self.up_block_types.iter().enumerate() {
            let source = blocks - 1 - i;
            let out_channels = self.block_out_channels[source];
            let transformer = match kind(name, "CrossAttnUpBlock2D", "UpBlock2D")? {
                BlockKind::CrossAttention => Some(transformer(source, out_channels)?),
                BlockKind::Plain => None,
            };
            up_blocks.push(BlockSpec {
                out_channels,
                layers: layers[source] + 1,
                transformer,
            });
        }
        let last = blocks - 1;
        let mid_transformer = TransformerSpec {
            only_cross_attention: false,
            ..transformer(last, self.block_out_channels[last])?
        };

        Ok(UNetSpec {
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            center_input_sample: self.center_input_sample,
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
            time_embed_dim: self.time_embedding_dim.unwrap_or(self.block_out_channels[0] * 4),
            block_out_channels: self.block_out_channels.clone(),
            down_blocks,
            mid_transformer,
            up_blocks,
            norm_num_groups,
            norm_eps: self.norm_eps,
            use_linear_projection: self.use_linear_projection,
            upcast_attention: self.upcast_attention.unwrap_or(false),
            downsample_padding: self.downsample_padding,
            mid_block_scale_factor: self.mid_block_scale_factor,
            resnet_out_scale_factor: self.resnet_out_scale_factor,
            conv_in_kernel: self.conv_in_kernel,
            conv_out_kernel: self.conv_out_kernel,
            sample_size: self.sample_size,
            text_time: self.text_time()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// stabilityai/stable-diffusion-2-1-base's unet/config.json (the community mirror's copy).
    const SD21_BASE: &str = r#"{"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0",
      "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
      "center_input_sample": false, "cross_attention_dim": 1024,
      "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
      "downsample_padding": 1, "dual_cross_attention": false, "flip_sin_to_cos": true, "freq_shift": 0,
      "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
      "norm_num_groups": 32, "num_class_embeds": null, "only_cross_attention": false, "out_channels": 4,
      "sample_size": 64, "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
      "use_linear_projection": true}"#;

    #[test]
    fn sd21_heads_come_from_attention_head_dim() {
        let config: UNetConfig = serde_json::from_str(SD21_BASE).unwrap();
        let spec = config.resolve().unwrap();
        let heads: Vec<_> = spec
            .down_blocks
            .iter()
            .map(|b| b.transformer.as_ref().map(|t| t.heads))
            .collect();
        assert_eq!(heads, [Some(5), Some(10), Some(20), None]);
        assert_eq!(spec.mid_transformer.heads, 20);
        assert_eq!(spec.up_blocks[1].transformer.as_ref().unwrap().heads, 20);
        assert_eq!(spec.up_blocks[3].transformer.as_ref().unwrap().heads, 5);
        assert_eq!(spec.up_blocks[0].layers, 3);
        assert_eq!(spec.time_embed_dim, 1280);
        assert_eq!(spec.downsamples(), 3);
    }

    #[test]
    fn unsupported_keys_are_named() {
        let mut config: UNetConfig = serde_json::from_str(SD21_BASE).unwrap();
        config.class_embed_type = Some(Value::String("timestep".into()));
        config.resnet_time_scale_shift = "scale_shift".into();
        let err = config.resolve().unwrap_err().to_string();
        assert!(err.contains("class_embed_type = \"timestep\""), "{err}");
        assert!(err.contains("resnet_time_scale_shift"), "{err}");
    }

    #[test]
    fn per_block_lists_must_match_the_block_count() {
        let mut config: UNetConfig = serde_json::from_str(SD21_BASE).unwrap();
        config.transformer_layers_per_block = PerBlock::Many(vec![1, 2]);
        let err = config.resolve().unwrap_err().to_string();
        assert!(err.contains("transformer_layers_per_block has 2 values"), "{err}");
    }
}
