//! Our UNet2DConditionModel: diffusers' architecture, built from a resolved `unet/config.json`
//! (`config::unet::UNetSpec`), on candle-nn layers. Module fields mirror the weight keys
//! (`down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight`), so no renaming is needed.

mod blocks;
pub mod embeddings;
mod transformer;

pub use self::transformer::CrossAttentionCache;

/// What a UNet is conditioned on besides the timestep: the text encoder's hidden states for
/// cross-attention, and for SDXL's `text_time` UNet the pooled text embedding and the
/// micro-conditioning values (diffusers' `added_cond_kwargs` `text_embeds` and `time_ids`).
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// (b, tokens, cross_attention_dim).
    pub context: Tensor,
    pub text_time: Option<TextTime>,
}

/// SDXL's added conditioning for a batch.
#[derive(Debug, Clone)]
pub struct TextTime {
    /// The pooled, projected text embedding, (b, pooled_dim).
    pub text_embeds: Tensor,
    /// Per row: original (h, w), crop (top, left), target (h, w), in pixels.
    pub time_ids: Vec<[f64; TextTimeSpec::TIME_IDS]>,
}

impl Conditioning {
    /// Text conditioning alone (SD 1.x/2.x).
    pub fn text(context: Tensor) -> Self {
        Self {
            context,
            text_time: None,
        }
    }

    pub fn batch_size(&self) -> Result<usize> {
        self.context.dim(0)
    }

    /// The number of text tokens each row's context has.
    pub fn tokens(&self) -> Result<usize> {
        self.context.dim(1)
    }

    /// Each row on its own (batch 1), in order: what [`Self::cat`] stacks.
    pub fn rows(&self) -> Result<Vec<Self>> {
        (0..self.batch_size()?)
            .map(|i| {
                Ok(Self {
                    context: self.context.narrow(0, i, 1)?,
                    text_time: match &self.text_time {
                        Some(t) => Some(TextTime {
                            text_embeds: t.text_embeds.narrow(0, i, 1)?,
                            time_ids: vec![t.time_ids[i]],
                        }),
                        None => None,
                    },
                })
            })
            .collect()
    }

    /// Rows of several conditionings stacked in order (CFG's uncond-then-cond batch); all or none
    /// must carry [`TextTime`].
    pub fn cat(parts: &[&Self]) -> Result<Self> {
        let context = Tensor::cat(&parts.iter().map(|p| &p.context).collect::<Vec<_>>(), 0)?;
        let text_time = match parts.iter().map(|p| p.text_time.as_ref()).collect::<Option<Vec<_>>>() {
            Some(added) if !added.is_empty() => Some(TextTime {
                text_embeds: Tensor::cat(&added.iter().map(|a| &a.text_embeds).collect::<Vec<_>>(), 0)?,
                time_ids: added.iter().flat_map(|a| a.time_ids.iter().copied()).collect(),
            }),
            _ if parts.iter().any(|p| p.text_time.is_some()) => {
                candle_core::bail!("internal: conditionings with and without SDXL's text_time in one batch")
            }
            _ => None,
        };
        Ok(Self { context, text_time })
    }
}

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::conv::{conv2d, Conv2d};
use crate::model::norm::{group_norm, GroupNorm};

use self::blocks::{BlockContext, DownBlock, MidBlock, UpBlock, UpBlockChannels};
use self::embeddings::{timestep_embedding, TimestepEmbedding};
use crate::config::unet::{TextTimeSpec, UNetSpec};
use crate::model::resnet::NormSpec;

#[derive(Debug)]
pub struct UNet2DConditionModel {
    spec: UNetSpec,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    /// SDXL: the MLP over the pooled text embedding and the time ids' sinusoids.
    add_embedding: Option<TimestepEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    /// Lever 5 (`SDFIX_CUDA_GRAPHS`): the body of the forward captured per input shape.
    graphs: crate::kernels::cuda::graph::GraphCache,
}

fn same_size_conv(vb: VarBuilder, in_channels: usize, out_channels: usize, kernel: usize) -> Result<Conv2d> {
    conv2d(in_channels, out_channels, kernel, kernel / 2, 1, vb)
}

impl UNet2DConditionModel {
    pub fn new(vb: VarBuilder, spec: &UNetSpec) -> Result<Self> {
        let channels = &spec.block_out_channels;
        let ctx = BlockContext {
            temb_channels: spec.time_embed_dim,
            norm: NormSpec {
                groups: spec.norm_num_groups,
                eps: spec.norm_eps,
            },
            use_linear_projection: spec.use_linear_projection,
            resnet_out_scale_factor: spec.resnet_out_scale_factor,
        };
        let blocks = spec.down_blocks.len();

        let mut down_blocks = Vec::with_capacity(blocks);
        let mut in_channels = channels[0];
        for (i, block) in spec.down_blocks.iter().enumerate() {
            let add_downsample = i + 1 < blocks;
            let vb = vb.pp("down_blocks").pp(i);
            down_blocks.push(DownBlock::new(
                vb,
                block,
                in_channels,
                add_downsample,
                spec.downsample_padding,
                &ctx,
            )?);
            in_channels = block.out_channels;
        }
        let last = channels[blocks - 1];
        let mid_block = MidBlock::new(
            vb.pp("mid_block"),
            last,
            &spec.mid_transformer,
            spec.mid_block_scale_factor,
            &ctx,
        )?;

        let mut up_blocks = Vec::with_capacity(blocks);
        let mut prev_output = last;
        for (i, block) in spec.up_blocks.iter().enumerate() {
            // The skips of up block i come from the down block at the mirrored level; its input
            // had the channels of the level below it (conv_in's for the top level).
            let level = blocks - 1 - i;
            let input = channels[level.saturating_sub(1)];
            let io = UpBlockChannels { prev_output, input };
            up_blocks.push(UpBlock::new(vb.pp("up_blocks").pp(i), block, io, i + 1 < blocks, &ctx)?);
            prev_output = block.out_channels;
        }

        Ok(Self {
            spec: spec.clone(),
            conv_in: same_size_conv(vb.pp("conv_in"), spec.in_channels, channels[0], spec.conv_in_kernel)?,
            time_embedding: TimestepEmbedding::new(vb.pp("time_embedding"), channels[0], spec.time_embed_dim)?,
            add_embedding: match spec.text_time {
                Some(text_time) => Some(TimestepEmbedding::new(
                    vb.pp("add_embedding"),
                    text_time.input_dim,
                    spec.time_embed_dim,
                )?),
                None => None,
            },
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(spec.norm_num_groups, channels[0], spec.norm_eps, vb.pp("conv_norm_out"))?,
            conv_out: same_size_conv(vb.pp("conv_out"), channels[0], spec.out_channels, spec.conv_out_kernel)?,
            graphs: Default::default(),
        })
    }

    pub fn spec(&self) -> &UNetSpec {
        &self.spec
    }

    /// The model output (epsilon, v or x0, per the scheduler's `prediction_type`) for `sample`
    /// (b, in_channels, h, w) at `timestep`, conditioned on `context` (b, tokens, cross_dim).
    /// Projects the context's keys and values anew; a loop over steps passes a cache instead
    /// ([`Self::forward_cached`]). SD 1.x/2.x only: SDXL's UNet needs [`Conditioning`]'s added
    /// parts.
    pub fn forward(&self, sample: &Tensor, timestep: f64, context: &Tensor) -> Result<Tensor> {
        let batch = sample.dim(0)?;
        self.forward_timesteps_cached(
            sample,
            &vec![timestep; batch],
            &Conditioning::text(context.clone()),
            &mut CrossAttentionCache::new(),
        )
    }

    /// [`Self::forward`] with any [`Conditioning`], the cross-attention keys and values of its
    /// context kept in `cache` (made at the first call, reused after; one cache per context).
    pub fn forward_cached(
        &self,
        sample: &Tensor,
        timestep: f64,
        conditioning: &Conditioning,
        cache: &mut CrossAttentionCache,
    ) -> Result<Tensor> {
        let batch = sample.dim(0)?;
        self.forward_timesteps_cached(sample, &vec![timestep; batch], conditioning, cache)
    }

    /// [`Self::forward`] with one timestep per sample (training draws them independently, as
    /// diffusers' `unet(noisy, timesteps)` takes a (b,) tensor).
    pub fn forward_timesteps(&self, sample: &Tensor, timesteps: &[f64], conditioning: &Conditioning) -> Result<Tensor> {
        self.forward_timesteps_cached(sample, timesteps, conditioning, &mut CrossAttentionCache::new())
    }

    /// SDXL's `aug_emb`: `add_embedding(cat(text_embeds, add_time_proj(time_ids)))`, diffusers'
    /// `get_aug_embed` for `text_time` (the time ids' sinusoids with the UNet's flip and shift).
    fn added_embedding(&self, conditioning: &Conditioning, dtype: candle_core::DType) -> Result<Option<Tensor>> {
        let (Some(spec), Some(mlp)) = (self.spec.text_time, &self.add_embedding) else {
            return Ok(None);
        };
        let Some(added) = &conditioning.text_time else {
            candle_core::bail!(
                "this UNet (addition_embed_type \"text_time\", SDXL) needs the pooled text embedding and time ids"
            )
        };
        let batch = conditioning.batch_size()?;
        if added.time_ids.len() != batch || added.text_embeds.dims() != [batch, spec.pooled_dim()] {
            candle_core::bail!(
                "SDXL conditioning: {} time-id rows and text_embeds {:?} for a batch of {batch} (pooled width {})",
                added.time_ids.len(),
                added.text_embeds.dims(),
                spec.pooled_dim()
            );
        }
        let flat: Vec<f64> = added.time_ids.iter().flatten().copied().collect();
        let time_embeds = timestep_embedding(
            &flat,
            spec.time_embed_dim,
            self.spec.flip_sin_to_cos,
            self.spec.freq_shift,
            added.text_embeds.device(),
        )?
        .reshape((batch, TextTimeSpec::TIME_IDS * spec.time_embed_dim))?;
        let input = Tensor::cat(&[&added.text_embeds.to_dtype(DType::F32)?, &time_embeds], 1)?.to_dtype(dtype)?;
        Ok(Some(mlp.forward(&input)?))
    }

    fn forward_timesteps_cached(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        conditioning: &Conditioning,
        cache: &mut CrossAttentionCache,
    ) -> Result<Tensor> {
        cache.start_pass();
        // CUDA: the per-op dims/strides uploads, the same every step, from candle's cache.
        let _uploads = crate::kernels::cuda_settings::htod_cache_guard(sample.device());
        let batch = sample.dim(0)?;
        if timesteps.len() != batch {
            candle_core::bail!("{} timesteps for a batch of {batch}", timesteps.len());
        }
        let sample = if self.spec.center_input_sample {
            sample.affine(2.0, -1.0)?
        } else {
            sample.clone()
        };
        let channels0 = self.spec.block_out_channels[0];
        let t_emb = timestep_embedding(
            timesteps,
            channels0,
            self.spec.flip_sin_to_cos,
            self.spec.freq_shift,
            sample.device(),
        )?
        .to_dtype(sample.dtype())?;
        // (b, time_embed_dim)
        let mut temb = self.time_embedding.forward(&t_emb)?;
        if let Some(added) = self.added_embedding(conditioning, temb.dtype())? {
            temb = (temb + added)?;
        }
        let context = &conditioning.context;
        if crate::kernels::cuda_settings::lever_on(sample.device(), |s| s.graphs) {
            // Lever 5: the body as a CUDA graph, its inputs copied in; the cross-attention keys
            // and values are recomputed inside it (see kernels::cuda::graph).
            return self.graphs.run(&[&sample, &temb, context], |inputs| {
                self.body(&inputs[0], &inputs[1], &inputs[2], &mut CrossAttentionCache::new())
            });
        }
        self.body(&sample, &temb, context, cache)
    }

    /// Everything after the embeddings: `sample` (b, c, h, w) with `temb` (b, time_embed_dim)
    /// and `context` (b, tokens, cross_dim).
    fn body(
        &self,
        sample: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        cache: &mut CrossAttentionCache,
    ) -> Result<Tensor> {
        let temb = temb.clone();
        let mut xs = self.conv_in.forward(sample)?;
        let mut skips = vec![xs.clone()];
        for block in &self.down_blocks {
            let (out, states) = block.forward(&xs, &temb, context, cache)?;
            xs = out;
            skips.extend(states);
        }
        xs = self.mid_block.forward(&xs, &temb, context, cache)?;
        for block in &self.up_blocks {
            let block_skips = skips.split_off(skips.len().saturating_sub(block.skips()));
            let upsample_size = match skips.last() {
                Some(next) => {
                    let (_, _, h, w) = next.dims4()?;
                    Some((h, w))
                }
                None => None,
            };
            xs = block.forward(&xs, block_skips, &temb, context, cache, upsample_size)?;
        }
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&xs)?)
    }
}
