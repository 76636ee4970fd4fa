//! What a sampler's step takes and gives, shared by every sampler file and by the dispatch in
//! [`super::sampler`]: the step's inputs ([`StepInput`]), its settings ([`StepParams`]), its
//! result ([`StepOutput`]), the multistep samplers' carried state ([`MultistepState`]), and the
//! variance-preserving arithmetic they all use (alpha and sigma of an alpha_bar, the half log-SNR
//! lambda and the ratio exp(-h) written to stay finite at alpha_bar = 0 and 1).
//!
//! A leaf: the samplers import it and the dispatch imports the samplers, so no sampler file
//! imports the dispatch.

use candle_core::{Result, Tensor};

use super::prediction::Prediction;
use crate::schedule::Schedule;

/// What every sampler's step takes that does not change from step to step: the prediction
/// type (all samplers), and DDIM's eta and x0 clipping (DDIM only).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepParams {
    pub prediction: Prediction,
    /// 0 = deterministic DDIM; 1 = DDPM-like ancestral noise.
    pub eta: f64,
    /// diffusers' `clip_sample`: clamp x0 to [-range, range] (SD configs turn it off).
    pub clip_sample_range: Option<f64>,
}

/// One step's inputs: where in the schedule, the latents x_t and the (guided) model output.
#[derive(Debug, Clone, Copy)]
pub struct StepInput<'a> {
    pub schedule: &'a Schedule,
    /// 0-based sampling step.
    pub index: usize,
    pub sample: &'a Tensor,
    pub model_output: &'a Tensor,
}

impl StepInput<'_> {
    /// alpha_bar at this step's timestep.
    pub fn alpha(&self) -> f64 {
        self.schedule.alpha_cumprod(self.index)
    }

    /// alpha_bar of the next listed timestep, or 1 (sigma = 0) after the last: where the
    /// non-DDIM samplers go.
    pub fn next_alpha(&self) -> f64 {
        self.schedule.next_alpha_cumprod_or_one(self.index)
    }
}

/// The result of one step.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// x_{t_prev}: the latents for the next step.
    pub prev_sample: Tensor,
    /// x0: the clean-sample estimate at this step.
    pub pred_original_sample: Tensor,
}

/// What the multistep samplers carry from one step to the next: the previous x0 estimates
/// (DPM++ 2M and its SDE, UniPC) and UniPC's corrector state (the sample its last prediction
/// started from, and that prediction's order). The one-step samplers leave it untouched.
#[derive(Debug, Clone, Default)]
pub struct MultistepState {
    /// The previous step's alpha_bar and x0 (DPM++ 2M, UniPC).
    pub previous: Option<(f64, Tensor)>,
    /// The one before (UniPC's order-2 corrector).
    pub older: Option<(f64, Tensor)>,
    /// UniPC: the (corrected) sample the previous prediction started from, and its order.
    pub last_sample: Option<Tensor>,
    pub last_order: usize,
}

/// (alpha, sigma) = (sqrt(a), sqrt(1 - a)) of alpha_bar `a`.
pub fn alpha_sigma(a: f64) -> (f64, f64) {
    (a.sqrt(), (1.0 - a).sqrt())
}

/// The ratio e = exp(-h) = (sigma_t alpha_s) / (alpha_t sigma_s) of a step from alpha_bar `a_s` to
/// `a_t` (h = lambda_t - lambda_s, lambda = log(alpha / sigma), the half log-SNR), written without
/// lambda so that it is finite where lambda is not: 0 out of a_s = 0 (lambda_s = -inf) and into
/// a_t = 1 (lambda_t = +inf).
pub fn exp_neg_h(a_s: f64, a_t: f64) -> f64 {
    let ((alpha_s, sigma_s), (alpha_t, sigma_t)) = (alpha_sigma(a_s), alpha_sigma(a_t));
    if alpha_s == 0.0 || sigma_t == 0.0 {
        return 0.0;
    }
    (sigma_t * alpha_s) / (alpha_t * sigma_s)
}

/// lambda = log(alpha / sigma) = log(SNR) / 2; -inf at a = 0, +inf at a = 1.
pub fn lambda(a: f64) -> f64 {
    0.5 * (a.ln() - (1.0 - a).ln())
}

/// `alpha_t x0 + sigma_t (c_eps eps + c_z z)`: the update every sampler here shares.
pub fn combine(x0: &Tensor, alpha_t: f64, eps: &Tensor, c_eps: f64, noise: Option<(&Tensor, f64)>) -> Result<Tensor> {
    let mut x = ((x0 * alpha_t)? + (eps * c_eps)?)?;
    if let Some((z, c_z)) = noise {
        if c_z != 0.0 {
            x = (x + (z * c_z)?)?;
        }
    }
    Ok(x)
}
