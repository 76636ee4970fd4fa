//! TAESD's decoder (madebyollin/taesd, MIT), as diffusers' `DecoderTiny` builds it for
//! `AutoencoderTiny`: a small all-convolution network that turns UNet-space latents into a
//! picture 8x larger, for live previews at a fraction of the VAE's cost.
//!
//! `decoder.layers` is one `nn.Sequential`; the weight keys are its indices, which this struct
//! mirrors (default config, 64 channels):
//!
//! | index | layer |
//! |---|---|
//! | 0, 1 | conv 3x3 (latent -> 64), activation |
//! | 2-4, 5, 6 | 3 blocks, nearest upsample x2, conv 3x3 without bias |
//! | 7-9, 10, 11 | the same |
//! | 12-14, 15, 16 | the same |
//! | 17, 18 | 1 block, conv 3x3 (64 -> 3) with bias |
//!
//! A block (`AutoencoderTinyBlock`) is `relu(conv -> act -> conv -> act -> conv (x) + x)`, its
//! convolutions at `{index}.conv.{0,2,4}`; its skip is the identity (every block keeps its
//! width), so it has no weights. Before the layers the latents are soft-clamped,
//! `tanh(x / 3) * 3`; after them the picture goes from TAESD's [0, 1] to diffusers' [-1, 1]
//! (`x * 2 - 1`). The original `taesd_decoder.pth` has the clamp as its layer 0, so its keys are
//! these indices plus one; only diffusers' layout is read here.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::taesd::{TaesdActivation, TaesdDecoderSpec};
use crate::model::conv::{conv2d, conv2d_no_bias, Conv2d};

/// TAESD's soft clamp of the latents: `tanh(x / LATENT_CLAMP) * LATENT_CLAMP`.
const LATENT_CLAMP: f64 = 3.0;

fn activate(xs: &Tensor, activation: TaesdActivation) -> Result<Tensor> {
    match activation {
        TaesdActivation::Relu => xs.relu(),
        TaesdActivation::Silu => candle_nn::ops::silu(xs),
    }
}

/// `AutoencoderTinyBlock` at one width.
#[derive(Debug)]
struct Block {
    convs: [Conv2d; 3],
    activation: TaesdActivation,
}

impl Block {
    fn new(channels: usize, activation: TaesdActivation, vb: VarBuilder) -> Result<Self> {
        let conv = |i: usize| conv2d(channels, channels, 3, 1, 1, vb.pp(format!("conv.{i}")));
        Ok(Self {
            convs: [conv(0)?, conv(2)?, conv(4)?],
            activation,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = activate(&self.convs[0].forward(xs)?, self.activation)?;
        let h = activate(&self.convs[1].forward(&h)?, self.activation)?;
        let h = self.convs[2].forward(&h)?;
        (h + xs)?.relu()
    }
}

#[derive(Debug)]
enum Layer {
    Conv(Conv2d),
    Activation,
    Block(Block),
    Upsample,
}

/// diffusers' `DecoderTiny`.
#[derive(Debug)]
pub struct TaesdDecoder {
    layers: Vec<Layer>,
    spec: TaesdDecoderSpec,
}

impl TaesdDecoder {
    /// Builds the decoder from `vb` at `decoder.layers` level (keys `0.weight`, `2.conv.0.weight`, ...).
    pub fn new(spec: &TaesdDecoderSpec, vb: VarBuilder) -> Result<Self> {
        let width = spec.channels;
        let mut layers = vec![
            Layer::Conv(conv2d(spec.latent_channels, width, 3, 1, 1, vb.pp("0"))?),
            Layer::Activation,
        ];
        let last = spec.blocks.len() - 1;
        for (stage, &blocks) in spec.blocks.iter().enumerate() {
            for _ in 0..blocks {
                let index = layers.len().to_string();
                layers.push(Layer::Block(Block::new(width, spec.activation, vb.pp(index))?));
            }
            if stage != last {
                layers.push(Layer::Upsample);
            }
            let vb = vb.pp(layers.len().to_string());
            layers.push(Layer::Conv(if stage == last {
                conv2d(width, spec.out_channels, 3, 1, 1, vb)?
            } else {
                conv2d_no_bias(width, width, 3, 1, 1, vb)?
            }));
        }
        Ok(Self {
            layers,
            spec: spec.clone(),
        })
    }

    pub fn spec(&self) -> &TaesdDecoderSpec {
        &self.spec
    }

    /// UNet-space latents (b, latent_channels, h, w) -> a picture in [-1, 1] (nominally; nothing
    /// clamps it), (b, out_channels, h * f, w * f) with f = [`TaesdDecoderSpec::upscale_factor`],
    /// as diffusers' `AutoencoderTiny.decode`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let mut xs = ((latents / LATENT_CLAMP)?.tanh()? * LATENT_CLAMP)?;
        for layer in &self.layers {
            xs = match layer {
                Layer::Conv(conv) => conv.forward(&xs)?,
                Layer::Activation => activate(&xs, self.spec.activation)?,
                Layer::Block(block) => block.forward(&xs)?,
                Layer::Upsample => {
                    let (_, _, h, w) = xs.dims4()?;
                    xs.upsample_nearest2d(h * self.spec.upsampling, w * self.spec.upsampling)?
                }
            };
        }
        // TAESD's [0, 1] -> [-1, 1]
        xs.affine(2.0, -1.0)
    }
}
