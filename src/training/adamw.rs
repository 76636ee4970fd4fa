//! AdamW (Loshchilov & Hutter 2019) exactly as PyTorch's `torch.optim.AdamW` computes it:
//! decoupled weight decay `p *= 1 - lr * wd`, then the Adam step with both bias corrections,
//! `p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`. A parameter without a gradient
//! this step is left alone (PyTorch skips `grad is None`), and each parameter counts its own
//! steps. candle-nn's `AdamW` applies the same formula but cannot save or restore its moments,
//! which `--resume` needs.

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle_core::{Tensor, Var};

/// PyTorch's defaults, and diffusers' `train_text_to_image.py` weight decay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

/// The moments of one parameter.
#[derive(Debug, Clone)]
struct Moments {
    m: Tensor,
    v: Tensor,
    steps: u64,
}

#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    moments: Vec<Moments>,
}

impl AdamW {
    /// Zero moments for `params`.
    pub fn new(params: &[Var], config: AdamWConfig) -> Result<Self> {
        let moments = params
            .iter()
            .map(|p| {
                Ok(Moments {
                    m: p.as_tensor().zeros_like()?,
                    v: p.as_tensor().zeros_like()?,
                    steps: 0,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { config, moments })
    }

    /// One update of every parameter that has a gradient, at learning rate `lr`.
    pub fn step(&mut self, params: &[Var], grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        let c = self.config;
        for ((param, grad), state) in params.iter().zip(grads).zip(&mut self.moments) {
            let Some(grad) = grad else { continue };
            state.steps += 1;
            let p = (param.as_tensor().detach() * (1.0 - lr * c.weight_decay))?;
            // PyTorch's lerp_(grad, 1 - b1): m + (1 - b1) (g - m).
            state.m = (&state.m + ((grad - &state.m)? * (1.0 - c.beta1))?)?;
            state.v = ((&state.v * c.beta2)? + (grad.sqr()? * (1.0 - c.beta2))?)?;
            let bias_correction1 = 1.0 - c.beta1.powi(state.steps as i32);
            let bias_correction2 = 1.0 - c.beta2.powi(state.steps as i32);
            let step_size = lr / bias_correction1;
            let denom = ((state.v.sqrt()? / bias_correction2.sqrt())? + c.eps)?;
            let p = (p - ((&state.m / denom)? * step_size)?)?;
            param.set(&p)?;
        }
        Ok(())
    }

    /// The moments by parameter name (`m.NAME`, `v.NAME`) and the step counts, to save.
    pub fn state(&self, names: &[String]) -> (HashMap<String, Tensor>, Vec<u64>) {
        let mut tensors = HashMap::new();
        for (name, state) in names.iter().zip(&self.moments) {
            tensors.insert(format!("m.{name}"), state.m.clone());
            tensors.insert(format!("v.{name}"), state.v.clone());
        }
        (tensors, self.moments.iter().map(|s| s.steps).collect())
    }

    /// Restores what [`Self::state`] saved.
    pub fn load_state(&mut self, names: &[String], tensors: &HashMap<String, Tensor>, steps: &[u64]) -> Result<()> {
        anyhow::ensure!(
            steps.len() == names.len(),
            "optimizer state has {} parameters, the model {}",
            steps.len(),
            names.len()
        );
        for ((name, state), &count) in names.iter().zip(&mut self.moments).zip(steps) {
            let (device, dtype) = (state.m.device().clone(), state.m.dtype());
            let get = |key: String| -> Result<Tensor> {
                let t = tensors
                    .get(&key)
                    .with_context(|| format!("optimizer state lacks {key}"))?;
                Ok(t.to_device(&device)?.to_dtype(dtype)?)
            };
            state.m = get(format!("m.{name}"))?;
            state.v = get(format!("v.{name}"))?;
            state.steps = count;
        }
        Ok(())
    }
}

/// PyTorch's `clip_grad_norm_(params, max_norm)`: the total 2-norm of all gradients, and every
/// gradient scaled by `min(1, max_norm / (norm + 1e-6))`. Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for grad in grads.iter().flatten() {
        let norm = grad.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;
        total += norm * norm;
    }
    let total = total.sqrt();
    // PyTorch's epsilon in the clip coefficient.
    let coefficient = (max_norm / (total + 1e-6)).min(1.0);
    for grad in grads.iter_mut().flatten() {
        *grad = (&*grad * coefficient)?;
    }
    Ok(total)
}
