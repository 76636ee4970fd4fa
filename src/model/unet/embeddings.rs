//! Sinusoidal timestep embeddings and their MLP (diffusers' `Timesteps`, `TimestepEmbedding`).

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::linear::{linear, Linear};

/// The largest period of the sinusoids (DDPM, as in the Transformer's positional encoding).
const MAX_PERIOD: f64 = 10_000.0;

/// `get_timestep_embedding`: for each timestep t, sin(t * f_i) and cos(t * f_i) over
/// f_i = exp(-ln(MAX_PERIOD) * i / (dim/2 - freq_shift)); cos first when `flip_sin_to_cos`.
/// Computed in f32 on the CPU as diffusers does, then moved. Returns (timesteps, dim).
pub fn timestep_embedding(
    timesteps: &[f64],
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let frequencies: Vec<f32> = (0..half)
        .map(|i| (-(MAX_PERIOD.ln()) * i as f64 / (half as f64 - freq_shift)).exp() as f32)
        .collect();
    let mut rows = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let arguments: Vec<f32> = frequencies.iter().map(|f| t as f32 * f).collect();
        let sin = arguments.iter().map(|a| a.sin());
        let cos = arguments.iter().map(|a| a.cos());
        if flip_sin_to_cos {
            rows.extend(cos.chain(sin));
        } else {
            rows.extend(sin.chain(cos));
        }
        // An odd dim gets one zero of padding, as diffusers pads.
        rows.extend(std::iter::repeat_n(0.0, dim - 2 * half));
    }
    Tensor::from_vec(rows, (timesteps.len(), dim), &Device::Cpu)?.to_device(device)
}

/// `TimestepEmbedding`: linear_1 -> SiLU -> linear_2.
#[derive(Debug)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(vb: VarBuilder, in_dim: usize, embed_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: linear(in_dim, embed_dim, vb.pp("linear_1"))?,
            linear_2: linear(embed_dim, embed_dim, vb.pp("linear_2"))?,
        })
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(xs)?.silu()?)
    }
}
