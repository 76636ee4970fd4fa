//! An exponential moving average of the weights (diffusers' `EMAModel` with its default
//! warm-up): after optimizer step `s` (0-based), `ema = d ema + (1 - d) w` with
//! `d = min(decay, (1 + s) / (10 + s))`, so early weights do not dominate. The saved model is
//! the average.

use anyhow::Result;
use candle_core::{Tensor, Var};

#[derive(Debug)]
pub struct Ema {
    pub decay: f64,
    pub weights: Vec<Tensor>,
}

impl Ema {
    pub fn new(params: &[Var], decay: f64) -> Result<Self> {
        let weights = params
            .iter()
            .map(|p| Ok(p.as_tensor().detach().copy()?))
            .collect::<Result<_>>()?;
        Ok(Self { decay, weights })
    }

    /// The decay after optimizer step `step` (0-based).
    pub fn decay_at(&self, step: usize) -> f64 {
        self.decay.min((1.0 + step as f64) / (10.0 + step as f64))
    }

    pub fn update(&mut self, params: &[Var], step: usize) -> Result<()> {
        let d = self.decay_at(step);
        for (ema, param) in self.weights.iter_mut().zip(params) {
            *ema = ((&*ema * d)? + (param.as_tensor().detach() * (1.0 - d))?)?;
        }
        Ok(())
    }
}
