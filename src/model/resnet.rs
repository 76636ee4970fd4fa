//! diffusers' `ResnetBlock2D` (time-conditioned in the UNet, `time_embedding_norm = "default"`;
//! without a time embedding in the VAE),
//! `Downsample2D` and `Upsample2D` (both with their 3x3 conv).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::profile;
use crate::model::conv::{conv2d, Conv2d};
use crate::model::linear::{linear, Linear};
use crate::model::norm::{group_norm, GroupNorm};

/// A 3x3 convolution that keeps the spatial size.
pub fn conv3x3(vb: VarBuilder, in_channels: usize, out_channels: usize) -> Result<Conv2d> {
    conv2d(in_channels, out_channels, 3, 1, 1, vb)
}

/// Group-norm settings shared by every resnet of a UNet or of a VAE decoder.
#[derive(Debug, Clone, Copy)]
pub struct NormSpec {
    pub groups: usize,
    pub eps: f64,
}

#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    /// Absent in the VAE's resnets, which have no time embedding.
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    /// A 1x1 conv when the channel count changes.
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        temb_channels: Option<usize>,
        norm: NormSpec,
        output_scale_factor: f64,
    ) -> Result<Self> {
        let conv_shortcut = if in_channels != out_channels {
            Some(conv2d(in_channels, out_channels, 1, 0, 1, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(norm.groups, in_channels, norm.eps, vb.pp("norm1"))?,
            conv1: conv3x3(vb.pp("conv1"), in_channels, out_channels)?,
            time_emb_proj: temb_channels
                .map(|t| linear(t, out_channels, vb.pp("time_emb_proj")))
                .transpose()?,
            norm2: group_norm(norm.groups, out_channels, norm.eps, vb.pp("norm2"))?,
            conv2: conv3x3(vb.pp("conv2"), out_channels, out_channels)?,
            conv_shortcut,
            output_scale_factor,
        })
    }

    /// `xs` (b, c_in, h, w), `temb` (b, temb_channels) -> (b, c_out, h, w).
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            // (b, c_out) -> (b, c_out, 1, 1)
            let t = proj.forward(&temb.silu()?)?.unsqueeze(2)?.unsqueeze(3)?;
            h = h.broadcast_add(&t)?;
        }
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        let out = (shortcut + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// A stride-2 3x3 conv. With `padding` 0, diffusers pads right and bottom by one first.
#[derive(Debug)]
pub struct Downsample2D {
    conv: Conv2d,
    pad_right_bottom: bool,
}

impl Downsample2D {
    pub fn new(vb: VarBuilder, channels: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            conv: conv2d(channels, channels, 3, padding, 2, vb.pp("conv"))?,
            pad_right_bottom: padding == 0,
        })
    }
}

impl Module for Downsample2D {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.pad_right_bottom {
            let padded = xs.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            self.conv.forward(&padded)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// Nearest-neighbour upsampling to a target size, then a 3x3 conv.
#[derive(Debug)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: conv3x3(vb.pp("conv"), channels, channels)?,
        })
    }

    /// Upsamples to `(height, width)`: the size of the skip connection it meets next, which is
    /// 2x for sizes divisible by the UNet's total stride (diffusers' `upsample_size`).
    pub fn forward(&self, xs: &Tensor, size: (usize, usize)) -> Result<Tensor> {
        let upsampled = profile::time("upsample", || xs.upsample_nearest2d(size.0, size.1))?;
        self.conv.forward(&upsampled)
    }
}
