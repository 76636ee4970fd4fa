//! The VAE of diffusers' `AutoencoderKL`, built from `vae/config.json`: the decoder
//! (`post_quant_conv`, then `Decoder`: conv_in, a mid block of resnet / attention / resnet, one
//! `UpDecoderBlock2D` per entry of `block_out_channels` in reverse, group norm + SiLU + conv_out)
//! and, loaded apart because only img2img and inpainting need it, the encoder
//! ([`VaeEncoder`]: `Encoder` then `quant_conv`, giving the latent distribution's mean and log
//! variance).
//!
//! Our own code on the same convolution, group norm and attention as the UNet: candle-
//! transformers' `AutoEncoderKL` decodes 3.8x slower than PyTorch on the CPU (its convolutions and
//! group norms; docs/performance.md), builds the encoder sampling never uses, and feeds its
//! attention a layout candle 0.11.1 multiplies wrongly for batches > 1 (huggingface/candle#3744).
//! [`Vae`] does not read the encoder's and `quant_conv`'s tensors ([`Vae::UNREAD_PREFIXES`]), nor
//! [`VaeEncoder`] the decoder's: text-to-image never holds the encoder's weights.

use candle_core::{DType, Result, Tensor};
use candle_nn::{Module, VarBuilder};

use crate::config::vae::VaeConfig;
use crate::model::attention::scaled_dot_product_attention;
use crate::model::conv::{conv2d, Conv2d};
use crate::model::linear::Linear;
use crate::model::norm::{group_norm, GroupNorm};
use crate::model::resnet::{Downsample2D, NormSpec, ResnetBlock2D, Upsample2D};
use crate::model::vae_tiling::VaeTiling;

/// diffusers' `Decoder` hard-codes this epsilon for every group norm.
const VAE_NORM_EPS: f64 = 1e-6;

/// The mid block's single-head self-attention over pixels (diffusers' `Attention` with
/// `residual_connection`, heads = channels / `attention_head_dim` = 1 as the decoder builds it).
#[derive(Debug)]
struct PixelAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

/// A `Linear` stored as (out, in) or, in checkpoints converted from the original LDM code, as a
/// (out, in, 1, 1) convolution.
fn linear_or_1x1(channels: usize, vb: VarBuilder) -> Result<Linear> {
    let weight = match vb.get_with_hints((channels, channels), "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL) {
        Ok(weight) => weight,
        Err(_) => vb
            .get((channels, channels, 1, 1), "weight")?
            .reshape((channels, channels))?,
    };
    let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
    Linear::new(weight, Some(bias))
}

impl PixelAttention {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        // diffusers < 0.15 saved these as query / key / value / proj_attn; it renames them when
        // loading, so do we.
        let names = if vb.contains_tensor("query.weight") {
            ["query", "key", "value", "proj_attn"]
        } else {
            ["to_q", "to_k", "to_v", "to_out.0"]
        };
        Ok(Self {
            group_norm: group_norm(groups, channels, VAE_NORM_EPS, vb.pp("group_norm"))?,
            to_q: linear_or_1x1(channels, vb.pp(names[0]))?,
            to_k: linear_or_1x1(channels, vb.pp(names[1]))?,
            to_v: linear_or_1x1(channels, vb.pp(names[2]))?,
            to_out: linear_or_1x1(channels, vb.pp(names[3]))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (batch, channels, height, width) = xs.dims4()?;
        // (b, c, h, w) -> (b, h*w, c)
        let tokens = self
            .group_norm
            .forward(xs)?
            .reshape((batch, channels, height * width))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.to_q.forward(&tokens)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
        let attended = scaled_dot_product_attention(&q, &k, &v, 1, None)?;
        let out = self
            .to_out
            .forward(&attended)?
            .transpose(1, 2)?
            .reshape((batch, channels, height, width))?;
        out + xs
    }
}

/// A VAE resnet: no time embedding, the VAE's group norm, output scale 1.
fn vae_resnet(vb: VarBuilder, config: &VaeConfig, c_in: usize, c_out: usize) -> Result<ResnetBlock2D> {
    let norm = NormSpec {
        groups: config.norm_num_groups,
        eps: VAE_NORM_EPS,
    };
    ResnetBlock2D::new(vb, c_in, c_out, None, norm, 1.0)
}

/// `UNetMidBlock2D` as the encoder and decoder both build it: resnet, attention, resnet at the
/// deepest channel count.
#[derive(Debug)]
struct MidBlock {
    resnets: [ResnetBlock2D; 2],
    attention: Option<PixelAttention>,
}

impl MidBlock {
    /// `vb` is the `mid_block` prefix.
    fn new(vb: VarBuilder, config: &VaeConfig, channels: usize) -> Result<Self> {
        Ok(Self {
            resnets: [
                vae_resnet(vb.pp("resnets").pp(0), config, channels, channels)?,
                vae_resnet(vb.pp("resnets").pp(1), config, channels, channels)?,
            ],
            attention: if config.mid_block_add_attention {
                Some(PixelAttention::new(
                    vb.pp("attentions").pp(0),
                    channels,
                    config.norm_num_groups,
                )?)
            } else {
                None
            },
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.resnets[0].forward(xs, None)?;
        if let Some(attention) = &self.attention {
            xs = attention.forward(&xs)?;
        }
        self.resnets[1].forward(&xs, None)
    }
}

#[derive(Debug)]
struct UpDecoderBlock {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

pub struct Vae {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpDecoderBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    scaling_factor: f64,
    downscale_factor: usize,
    /// The tiles of [`Vae::decode_tiled`], or why this VAE cannot be tiled.
    tiling: std::result::Result<VaeTiling, String>,
}

impl Vae {
    /// Weight-name prefixes sampling never reads (the encoder half).
    pub const UNREAD_PREFIXES: &'static [&'static str] = &["encoder.", "quant_conv."];

    /// `config` must have passed [`VaeConfig::validate`].
    pub fn new(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        let channels = &config.block_out_channels;
        let Some(&deepest) = channels.last() else {
            candle_core::bail!("vae: block_out_channels is empty")
        };
        let resnet = |vb: VarBuilder, c_in: usize, c_out: usize| vae_resnet(vb, config, c_in, c_out);
        let post_quant_conv = if config.use_post_quant_conv {
            let c = config.latent_channels;
            Some(conv2d(c, c, 1, 0, 1, vb.pp("post_quant_conv"))?)
        } else {
            None
        };
        let vb = vb.pp("decoder");
        let mid_block = MidBlock::new(vb.pp("mid_block"), config, deepest)?;
        let reversed: Vec<usize> = channels.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(reversed.len());
        let mut previous = deepest;
        for (index, &out) in reversed.iter().enumerate() {
            let block = vb.pp("up_blocks").pp(index);
            let resnets = (0..config.layers_per_block + 1)
                .map(|j| resnet(block.pp("resnets").pp(j), if j == 0 { previous } else { out }, out))
                .collect::<Result<_>>()?;
            let upsampler = if index + 1 < reversed.len() {
                Some(Upsample2D::new(block.pp("upsamplers").pp(0), out)?)
            } else {
                None
            };
            up_blocks.push(UpDecoderBlock { resnets, upsampler });
            previous = out;
        }
        Ok(Self {
            post_quant_conv,
            conv_in: conv2d(config.latent_channels, deepest, 3, 1, 1, vb.pp("conv_in"))?,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(
                config.norm_num_groups,
                channels[0],
                VAE_NORM_EPS,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: conv2d(channels[0], config.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
            scaling_factor: config.scaling_factor,
            downscale_factor: config.downscale_factor(),
            tiling: VaeTiling::new(config),
        })
    }

    /// The dtype to decode in for a model running in `model_dtype`: f32 under f16 when the config
    /// says `force_upcast` (SD's VAE overflows in f16; diffusers' pipelines upcast the same way).
    pub fn decode_dtype(config: &VaeConfig, model_dtype: DType) -> DType {
        if config.force_upcast() && model_dtype == DType::F16 {
            DType::F32
        } else {
            model_dtype
        }
    }

    /// The decoder's dtype on `device`: [`Self::decode_dtype`], but bf16 under lever 6
    /// (`SDFIX_CUDA_VAE_BF16=1`, CUDA only) when the model runs in f16 or bf16 and the config
    /// file does not say `force_upcast: true` (SDXL's VAE stays in f32). bf16 has f32's exponent
    /// range, so SD's VAE does not overflow in it as it does in f16; ComfyUI decodes SD VAEs in
    /// bf16 the same way. `--dtype f32` (the parity mode) is never changed; `scripts/gpu_check.sh`
    /// compares the bf16 decode's pixels with the f32 decode's (`sdfix kernel-check`).
    pub fn decode_dtype_on(config: &VaeConfig, model_dtype: DType, device: &candle_core::Device) -> DType {
        let half = matches!(model_dtype, DType::F16 | DType::BF16);
        if half && !config.force_upcast_stated() && crate::kernels::cuda_settings::lever_on(device, |s| s.vae_bf16) {
            DType::BF16
        } else {
            Self::decode_dtype(config, model_dtype)
        }
    }

    /// Image pixels per latent pixel along each side (8 for SD).
    pub fn downscale_factor(&self) -> usize {
        self.downscale_factor
    }

    /// Decodes sampler latents (b, c, h, w), dividing by `scaling_factor` first as diffusers'
    /// pipeline does. Returns images in [-1, 1] (unclamped), (b, 3, h * f, w * f).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.decode_vae_scale(&(latents / self.scaling_factor)?)
    }

    /// [`Vae::decode`] in tiles when the latents are larger than a tile, as diffusers'
    /// `AutoencoderKL.decode` after `enable_tiling()` ([`crate::model::vae_tiling`]); smaller
    /// latents decode whole, as there. Fails for a VAE whose config cannot be tiled.
    pub fn decode_tiled(&self, latents: &Tensor) -> Result<Tensor> {
        let grid = self
            .tiling
            .as_ref()
            .map_err(|e| candle_core::Error::Msg(e.clone()))?
            .decode;
        let (_, _, h, w) = latents.dims4()?;
        let xs = (latents / self.scaling_factor)?;
        if !grid.applies(h, w) {
            return self.decode_vae_scale(&xs);
        }
        grid.run(&xs, |tile| self.decode_vae_scale(tile))
    }

    /// `post_quant_conv` and the decoder on latents in the VAE's own scale.
    fn decode_vae_scale(&self, latents: &Tensor) -> Result<Tensor> {
        let mut xs = latents.clone();
        if let Some(conv) = &self.post_quant_conv {
            xs = conv.forward(&xs)?;
        }
        xs = self.mid_block.forward(&self.conv_in.forward(&xs)?)?;
        for block in &self.up_blocks {
            for resnet in &block.resnets {
                xs = resnet.forward(&xs, None)?;
            }
            if let Some(upsampler) = &block.upsampler {
                let (_, _, h, w) = xs.dims4()?;
                xs = upsampler.forward(&xs, (2 * h, 2 * w))?;
            }
        }
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&xs)?)
    }
}

/// diffusers' `DiagonalGaussianDistribution` clamps the log variance to this range.
const LOGVAR_RANGE: (f64, f64) = (-30.0, 20.0);

/// One `DownEncoderBlock2D`: `layers_per_block` resnets, then (but for the last block) a stride-2
/// conv that pads right and bottom (diffusers builds the encoder's downsamplers with padding 0).
#[derive(Debug)]
struct DownEncoderBlock {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
}

/// The VAE encoder: image in [-1, 1] (b, 3, H, W) to the latent distribution (diffusers'
/// `AutoencoderKL.encode` returning `latent_dist`). Its output is not yet multiplied by the
/// scaling factor: [`LatentDistribution::latents`] does that, as diffusers' pipelines do.
pub struct VaeEncoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
    latent_channels: usize,
    scaling_factor: f64,
    downscale_factor: usize,
    /// The tiles of [`VaeEncoder::encode_tiled`], or why this VAE cannot be tiled.
    tiling: std::result::Result<VaeTiling, String>,
}

/// The encoder's Gaussian over latents, (b, c, h, w) each, in the VAE's own scale.
#[derive(Debug, Clone)]
pub struct LatentDistribution {
    pub mean: Tensor,
    /// exp(logvar / 2), with logvar clamped as diffusers does.
    pub std: Tensor,
    scaling_factor: f64,
}

impl LatentDistribution {
    /// Sampler-scale latents (times `scaling_factor`): the mean, or with `noise` (standard normal,
    /// shaped like the mean) the sample `mean + std * noise` (diffusers' `retrieve_latents` with
    /// `sample_mode="sample"`, its pipelines' default, or `"argmax"` for the mean).
    pub fn latents(&self, noise: Option<&Tensor>) -> Result<Tensor> {
        let latents = match noise {
            Some(noise) => (&self.mean + (&self.std * noise)?)?,
            None => self.mean.clone(),
        };
        latents * self.scaling_factor
    }
}

impl VaeEncoder {
    /// Weight-name prefixes the encoder never reads (the decoder half).
    pub const UNREAD_PREFIXES: &'static [&'static str] = &["decoder.", "post_quant_conv."];

    /// `config` must have passed [`VaeConfig::validate`].
    pub fn new(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        let channels = &config.block_out_channels;
        let Some(&deepest) = channels.last() else {
            candle_core::bail!("vae: block_out_channels is empty")
        };
        let resnet = |vb: VarBuilder, c_in: usize, c_out: usize| vae_resnet(vb, config, c_in, c_out);
        let quant_conv = if config.use_quant_conv {
            let c = 2 * config.latent_channels;
            Some(conv2d(c, c, 1, 0, 1, vb.pp("quant_conv"))?)
        } else {
            None
        };
        let vb = vb.pp("encoder");
        let mut down_blocks = Vec::with_capacity(channels.len());
        let mut previous = channels[0];
        for (index, &out) in channels.iter().enumerate() {
            let block = vb.pp("down_blocks").pp(index);
            let resnets = (0..config.layers_per_block)
                .map(|j| resnet(block.pp("resnets").pp(j), if j == 0 { previous } else { out }, out))
                .collect::<Result<_>>()?;
            let downsampler = if index + 1 < channels.len() {
                Some(Downsample2D::new(block.pp("downsamplers").pp(0), out, 0)?)
            } else {
                None
            };
            down_blocks.push(DownEncoderBlock { resnets, downsampler });
            previous = out;
        }
        Ok(Self {
            conv_in: conv2d(config.in_channels, channels[0], 3, 1, 1, vb.pp("conv_in"))?,
            down_blocks,
            mid_block: MidBlock::new(vb.pp("mid_block"), config, deepest)?,
            conv_norm_out: group_norm(config.norm_num_groups, deepest, VAE_NORM_EPS, vb.pp("conv_norm_out"))?,
            // double_z: mean and log variance.
            conv_out: conv2d(deepest, 2 * config.latent_channels, 3, 1, 1, vb.pp("conv_out"))?,
            quant_conv,
            latent_channels: config.latent_channels,
            scaling_factor: config.scaling_factor,
            downscale_factor: config.downscale_factor(),
            tiling: VaeTiling::new(config),
        })
    }

    /// Image pixels per latent pixel along each side (8 for SD).
    pub fn downscale_factor(&self) -> usize {
        self.downscale_factor
    }

    /// Encodes images in [-1, 1], (b, 3, H, W) with H and W multiples of the downscale factor,
    /// to their latent distribution, (b, latent_channels, H / f, W / f) each.
    pub fn encode(&self, images: &Tensor) -> Result<LatentDistribution> {
        self.check_size(images)?;
        self.distribution(&self.moments(images)?)
    }

    /// [`VaeEncoder::encode`] in tiles when the images are larger than a tile, as diffusers'
    /// `AutoencoderKL.encode` after `enable_tiling()` ([`crate::model::vae_tiling`]): the
    /// moments (mean and log variance) are blended across tiles, then split and clamped as
    /// diffusers' `DiagonalGaussianDistribution` does with the tiled moments. Smaller images
    /// encode whole, as there. Fails for a VAE whose config cannot be tiled.
    pub fn encode_tiled(&self, images: &Tensor) -> Result<LatentDistribution> {
        let grid = self
            .tiling
            .as_ref()
            .map_err(|e| candle_core::Error::Msg(e.clone()))?
            .encode;
        self.check_size(images)?;
        let (_, _, h, w) = images.dims4()?;
        let moments = if grid.applies(h, w) {
            grid.run(images, |tile| self.moments(tile))?
        } else {
            self.moments(images)?
        };
        self.distribution(&moments)
    }

    fn check_size(&self, images: &Tensor) -> Result<()> {
        let (_, _, height, width) = images.dims4()?;
        let f = self.downscale_factor;
        if !height.is_multiple_of(f) || !width.is_multiple_of(f) {
            candle_core::bail!("vae encoder: {width}x{height} is not a multiple of {f}");
        }
        Ok(())
    }

    /// The encoder and `quant_conv`: (b, 2c, h, w), mean then log variance.
    fn moments(&self, images: &Tensor) -> Result<Tensor> {
        let mut xs = self.conv_in.forward(images)?;
        for block in &self.down_blocks {
            for resnet in &block.resnets {
                xs = resnet.forward(&xs, None)?;
            }
            if let Some(downsampler) = &block.downsampler {
                xs = downsampler.forward(&xs)?;
            }
        }
        xs = self.mid_block.forward(&xs)?;
        let mut moments = self.conv_out.forward(&self.conv_norm_out.forward_silu(&xs)?)?;
        if let Some(conv) = &self.quant_conv {
            moments = conv.forward(&moments)?;
        }
        Ok(moments)
    }

    /// diffusers' `DiagonalGaussianDistribution` of `moments`.
    fn distribution(&self, moments: &Tensor) -> Result<LatentDistribution> {
        // (b, 2c, h, w) -> mean and log variance, (b, c, h, w) each.
        let c = self.latent_channels;
        let mean = moments.narrow(1, 0, c)?.contiguous()?;
        let logvar = moments.narrow(1, c, c)?.clamp(LOGVAR_RANGE.0, LOGVAR_RANGE.1)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok(LatentDistribution {
            mean,
            std,
            scaling_factor: self.scaling_factor,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Off CUDA, lever 6 changes nothing: SD's VAE under f16 still decodes in f32
    /// (force_upcast's default), and f32 stays f32.
    #[test]
    fn decode_dtype_on_the_cpu_is_unchanged() {
        let sd21: VaeConfig =
            serde_json::from_str(include_str!("../../models/arch/sd2.1-base/vae/config.json")).unwrap();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            assert_eq!(
                Vae::decode_dtype_on(&sd21, dtype, &Device::Cpu),
                Vae::decode_dtype(&sd21, dtype)
            );
        }
        assert_eq!(Vae::decode_dtype(&sd21, DType::F16), DType::F32);
    }
}
