//! The DDIM step in the x0 formulation (Song et al. 2021, eq. 12; Lin et al. 2024, Section 3.2),
//! the only place where the schedule meets tensors.
//!
//! From the model output we recover the clean-sample estimate x0 and the noise estimate eps, then
//! move to the next timestep: `x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z`.
//! For v-prediction this has no division by sqrt(alpha_bar_t), so it stays finite at a zero-SNR
//! t = T, where epsilon-prediction cannot (x0 = (x - sqrt(1 - a) eps) / sqrt(a) with a = 0).
//!
//! Notation (diffusers' names in brackets):
//!
//! | here        | meaning                                             | diffusers                 |
//! |-------------|-----------------------------------------------------|---------------------------|
//! | `alpha`     | alpha_bar at this step's timestep t                 | `alpha_prod_t`            |
//! | `alpha_prev`| alpha_bar at the next timestep the sampler visits   | `alpha_prod_t_prev`       |
//! | `x0`        | the clean-sample estimate                           | `pred_original_sample`    |
//! | `eps`       | the noise estimate                                  | `pred_epsilon`            |
//! | `sigma`     | eta times the DDPM posterior's std (eq. 16)         | `std_dev_t`               |
//! | `direction` | sqrt(1 - a_prev - sigma^2), the weight of eps       | `pred_sample_direction`   |
//!
//! Departure from diffusers, on purpose: `a_prev` is alpha_bar of the *next timestep in the
//! schedule* ([`Schedule::prev_alpha_cumprod`]); diffusers uses `t - T / n`, a timestep the
//! sampler never visits for `linspace`, and for `trailing` when n does not divide T.

use candle_core::{Result, Tensor};

use super::prediction::x0_and_eps;
use super::step::{StepOutput, StepParams};
use crate::schedule::Schedule;

/// The standard deviation of the DDIM noise (Song et al. 2021, eq. 16): eta times the DDPM
/// posterior's, sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev)).
pub fn sigma(alpha: f64, alpha_prev: f64, eta: f64) -> f64 {
    if eta == 0.0 {
        return 0.0;
    }
    let variance = (1.0 - alpha_prev) / (1.0 - alpha) * (1.0 - alpha / alpha_prev);
    eta * variance.max(0.0).sqrt()
}

/// One DDIM step from sampling step `index` of `schedule` to the next; stages numbered as in
/// diffusers' `DDIMScheduler.step`.
///
/// `noise` (same shape as `sample`) is required when `params.eta > 0`.
pub fn ddim_step(
    schedule: &Schedule,
    index: usize,
    sample: &Tensor,
    model_output: &Tensor,
    params: &StepParams,
    noise: Option<&Tensor>,
) -> Result<StepOutput> {
    if index >= schedule.timesteps.len() {
        candle_core::bail!(
            "DDIM step {index} is past the schedule's {} steps",
            schedule.timesteps.len()
        );
    }
    // 1-2. alpha_bar now and at the next visited timestep (see the departure above).
    let alpha = schedule.alpha_cumprod(index);
    let alpha_prev = schedule.prev_alpha_cumprod(index);
    // 3. x0 and eps from the model output.
    let (mut x0, eps) = x0_and_eps(sample, model_output, params.prediction, alpha)?;
    // 4. Clip x0 (off in SD's configs).
    if let Some(range) = params.clip_sample_range {
        x0 = x0.clamp(-range, range)?;
    }
    // 5. sigma_t (eq. 16).
    let sigma = sigma(alpha, alpha_prev, params.eta);
    // 6. The direction pointing to x_t; clamped at 0: rounding can push 1 - a_prev - sigma^2 a hair
    //    below zero (diffusers gets NaN).
    let direction = (1.0 - alpha_prev - sigma * sigma).max(0.0).sqrt();
    // 7. x_prev = sqrt(a_prev) x0 + direction eps (eq. 12), plus sigma z.
    let prev = ((&x0 * alpha_prev.sqrt())? + (eps * direction)?)?;
    let prev_sample = match (sigma > 0.0, noise) {
        (false, _) => prev,
        (true, Some(noise)) => (prev + (noise * sigma)?)?,
        (true, None) => candle_core::bail!("eta > 0 needs noise for the DDIM step"),
    };
    Ok(StepOutput {
        prev_sample,
        pred_original_sample: x0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::Prediction;
    use crate::schedule::{BetaSource, ScheduleSpec, TimestepSpacing};
    use candle_core::Device;

    fn schedule(steps: usize, zero_terminal_snr: bool) -> Schedule {
        Schedule::new(&ScheduleSpec {
            betas: BetaSource::STABLE_DIFFUSION,
            zero_terminal_snr,
            spacing: TimestepSpacing::Trailing,
            steps,
            steps_offset: 1,
            set_alpha_to_one: false,
        })
        .unwrap()
    }

    fn scalar(t: &Tensor) -> f32 {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0]
    }

    #[test]
    fn v_prediction_is_finite_at_zero_snr_terminal_step() {
        let s = schedule(10, true);
        assert_eq!(s.alpha_cumprod(0), 0.0);
        let x = Tensor::new(&[0.7f32], &Device::Cpu).unwrap();
        let v = Tensor::new(&[-0.3f32], &Device::Cpu).unwrap();
        let params = StepParams {
            prediction: Prediction::VPrediction,
            eta: 0.0,
            clip_sample_range: None,
        };
        let out = scalar(&ddim_step(&s, 0, &x, &v, &params, None).unwrap().prev_sample);
        // At a = 0: x0 = -v, eps = x; x_prev = sqrt(a') * 0.3 + sqrt(1 - a') * 0.7.
        let a = s.prev_alpha_cumprod(0);
        let expected = (a.sqrt() * 0.3 + (1.0 - a).sqrt() * 0.7) as f32;
        assert!((out - expected).abs() < 1e-6, "{out} vs {expected}");
    }

    #[test]
    fn epsilon_prediction_diverges_at_zero_snr_terminal_step() {
        // Why sdfix refuses zero SNR with an epsilon model: x0 divides by sqrt(alpha_bar_T) = 0.
        let s = schedule(10, true);
        let x = Tensor::new(&[0.7f32], &Device::Cpu).unwrap();
        let params = StepParams {
            prediction: Prediction::Epsilon,
            eta: 0.0,
            clip_sample_range: None,
        };
        let out = scalar(
            &ddim_step(&s, 0, &x, &x.affine(0.5, 0.0).unwrap(), &params, None)
                .unwrap()
                .prev_sample,
        );
        assert!(!out.is_finite());
    }

    #[test]
    fn a_perfect_x0_prediction_lands_on_x0_at_the_end() {
        let s = schedule(7, true);
        let x0 = Tensor::new(&[0.25f32], &Device::Cpu).unwrap();
        let mut x = Tensor::new(&[1.3f32], &Device::Cpu).unwrap();
        let params = StepParams {
            prediction: Prediction::Sample,
            eta: 0.0,
            clip_sample_range: None,
        };
        for i in 0..7 {
            x = ddim_step(&s, i, &x, &x0, &params, None).unwrap().prev_sample;
        }
        // At a zero-SNR t = T the input is all noise, eps = 1.3, and with a perfect x0 DDIM keeps
        // eps fixed; the last alpha_bar is alpha_bar_0 (set_alpha_to_one = false), not 1.
        let a = s.final_alpha_cumprod;
        let expected = (a.sqrt() * 0.25 + (1.0 - a).sqrt() * 1.3) as f32;
        assert!((scalar(&x) - expected).abs() < 1e-5, "{} vs {expected}", scalar(&x));
    }

    #[test]
    fn eta_one_sigma_is_the_ddpm_posterior_std() {
        let (a, a_prev) = (0.5f64, 0.8f64);
        let beta_t = 1.0 - a / a_prev;
        let posterior = ((1.0 - a_prev) / (1.0 - a) * beta_t).sqrt();
        assert!((sigma(a, a_prev, 1.0) - posterior).abs() < 1e-15);
        assert_eq!(sigma(a, a_prev, 0.0), 0.0);
    }
}
