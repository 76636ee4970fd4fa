//! The UNet's down, mid and up blocks: diffusers' `CrossAttnDownBlock2D`/`DownBlock2D`,
//! `UNetMidBlock2DCrossAttn` and `CrossAttnUpBlock2D`/`UpBlock2D`. A block without a transformer is
//! the same block with no attentions, so one struct serves both kinds.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::transformer::{CrossAttentionCache, Transformer2DModel};
use crate::config::unet::{BlockSpec, TransformerSpec};
use crate::model::resnet::{Downsample2D, NormSpec, ResnetBlock2D, Upsample2D};

/// What every block needs besides its own spec.
#[derive(Debug, Clone, Copy)]
pub struct BlockContext {
    pub temb_channels: usize,
    pub norm: NormSpec,
    pub use_linear_projection: bool,
    pub resnet_out_scale_factor: f64,
}

impl BlockContext {
    fn transformer(&self, vb: VarBuilder, channels: usize, spec: &TransformerSpec) -> Result<Transformer2DModel> {
        Transformer2DModel::new(vb, channels, self.norm.groups, self.use_linear_projection, spec)
    }

    fn transformers(
        &self,
        vb: VarBuilder,
        count: usize,
        channels: usize,
        spec: Option<&TransformerSpec>,
    ) -> Result<Vec<Transformer2DModel>> {
        match spec {
            Some(spec) => (0..count).map(|i| self.transformer(vb.pp(i), channels, spec)).collect(),
            None => Ok(Vec::new()),
        }
    }
}

#[derive(Debug)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    pub fn new(
        vb: VarBuilder,
        spec: &BlockSpec,
        in_channels: usize,
        add_downsample: bool,
        downsample_padding: usize,
        ctx: &BlockContext,
    ) -> Result<Self> {
        let out = spec.out_channels;
        let resnets = (0..spec.layers)
            .map(|j| {
                let input = if j == 0 { in_channels } else { out };
                ResnetBlock2D::new(
                    vb.pp("resnets").pp(j),
                    input,
                    out,
                    Some(ctx.temb_channels),
                    ctx.norm,
                    ctx.resnet_out_scale_factor,
                )
            })
            .collect::<Result<_>>()?;
        let attentions = ctx.transformers(vb.pp("attentions"), spec.layers, out, spec.transformer.as_ref())?;
        let downsampler = if add_downsample {
            Some(Downsample2D::new(vb.pp("downsamplers.0"), out, downsample_padding)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// Returns the output and the states it hands to the up blocks (one per resnet, plus the
    /// downsampled output).
    pub fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        cache: &mut CrossAttentionCache,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut xs = xs.clone();
        let mut states = Vec::with_capacity(self.resnets.len() + 1);
        for (j, resnet) in self.resnets.iter().enumerate() {
            xs = resnet.forward(&xs, Some(temb))?;
            if let Some(attention) = self.attentions.get(j) {
                xs = attention.forward(&xs, context, cache)?;
            }
            states.push(xs.clone());
        }
        if let Some(downsampler) = &self.downsampler {
            xs = downsampler.forward(&xs)?;
            states.push(xs.clone());
        }
        Ok((xs, states))
    }
}

#[derive(Debug)]
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    /// One transformer between two resnets (`UNetMidBlock2DCrossAttn` with `num_layers = 1`).
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        spec: &TransformerSpec,
        output_scale_factor: f64,
        ctx: &BlockContext,
    ) -> Result<Self> {
        let resnets = (0..2)
            .map(|j| {
                ResnetBlock2D::new(
                    vb.pp("resnets").pp(j),
                    channels,
                    channels,
                    Some(ctx.temb_channels),
                    ctx.norm,
                    output_scale_factor,
                )
            })
            .collect::<Result<_>>()?;
        let attentions = vec![ctx.transformer(vb.pp("attentions.0"), channels, spec)?];
        Ok(Self { resnets, attentions })
    }

    pub fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        cache: &mut CrossAttentionCache,
    ) -> Result<Tensor> {
        let mut xs = self.resnets[0].forward(xs, Some(temb))?;
        for (attention, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            xs = resnet.forward(&attention.forward(&xs, context, cache)?, Some(temb))?;
        }
        Ok(xs)
    }
}

#[derive(Debug)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

/// Channels around an up block: what comes from below, and the skips it consumes.
#[derive(Debug, Clone, Copy)]
pub struct UpBlockChannels {
    /// Output channels of the previous (lower) up block, or the mid block.
    pub prev_output: usize,
    /// Channels of the down block at the same level's input: the last skip has these.
    pub input: usize,
}

impl UpBlock {
    pub fn new(
        vb: VarBuilder,
        spec: &BlockSpec,
        channels: UpBlockChannels,
        add_upsample: bool,
        ctx: &BlockContext,
    ) -> Result<Self> {
        let out = spec.out_channels;
        let resnets = (0..spec.layers)
            .map(|j| {
                let skip = if j + 1 == spec.layers { channels.input } else { out };
                let below = if j == 0 { channels.prev_output } else { out };
                ResnetBlock2D::new(
                    vb.pp("resnets").pp(j),
                    below + skip,
                    out,
                    Some(ctx.temb_channels),
                    ctx.norm,
                    ctx.resnet_out_scale_factor,
                )
            })
            .collect::<Result<_>>()?;
        let attentions = ctx.transformers(vb.pp("attentions"), spec.layers, out, spec.transformer.as_ref())?;
        let upsampler = if add_upsample {
            Some(Upsample2D::new(vb.pp("upsamplers.0"), out)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// How many skip states the block consumes.
    pub fn skips(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` are this block's skip states in the order the down path produced them; they are
    /// consumed last first. `upsample_size` is the size of the next block's last skip.
    pub fn forward(
        &self,
        xs: &Tensor,
        mut skips: Vec<Tensor>,
        temb: &Tensor,
        context: &Tensor,
        cache: &mut CrossAttentionCache,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (j, resnet) in self.resnets.iter().enumerate() {
            let Some(skip) = skips.pop() else {
                candle_core::bail!("up block is missing a skip connection");
            };
            xs = resnet.forward(&Tensor::cat(&[&xs, &skip], 1)?, Some(temb))?;
            if let Some(attention) = self.attentions.get(j) {
                xs = attention.forward(&xs, context, cache)?;
            }
        }
        match (&self.upsampler, upsample_size) {
            (Some(upsampler), Some(size)) => upsampler.forward(&xs, size),
            (Some(upsampler), None) => {
                let (_, _, h, w) = xs.dims4()?;
                upsampler.forward(&xs, (2 * h, 2 * w))
            }
            (None, _) => Ok(xs),
        }
    }
}
