//! Euler (Karras et al. 2022, Algorithm 2 without churn; k-diffusion `sample_euler`; diffusers'
//! `EulerDiscreteScheduler`), written in the variance-preserving x0 form.
//!
//! k-diffusion works on x_k = x / alpha_t with sigma_k = sigma_t / alpha_t, where
//! x_k = x0 + sigma_k eps. Its step is x_k' = x_k + (sigma_k' - sigma_k) d with
//! d = (x_k - x0) / sigma_k = eps, so x_k' = x0 + sigma_k' eps and, back in VP form,
//! `x' = alpha_t' x0 + sigma_t' eps`: the DDIM step with eta 0. Written this way it needs no
//! sigma_k, which is infinite at a zero-SNR t = T; diffusers clamps alpha_bar_T to 2^-24 instead
//! (`--terminal-alpha-bar diffusers` reproduces that). The one difference from sdfix's DDIM is
//! where the last step goes: sigma = 0 (x0), as k-diffusion and diffusers' Euler do, where DDIM
//! goes to alpha_bar_0 unless `set_alpha_to_one`.

use candle_core::Result;

use super::prediction::{x0_and_eps, Prediction};
use super::step::{alpha_sigma, combine, StepInput, StepOutput};

/// One Euler step from `input.index` to the next timestep (or to sigma = 0 after the last).
pub fn step(input: &StepInput, prediction: Prediction) -> Result<StepOutput> {
    let (x0, eps) = x0_and_eps(input.sample, input.model_output, prediction, input.alpha())?;
    let (alpha_t, sigma_t) = alpha_sigma(input.next_alpha());
    Ok(StepOutput {
        prev_sample: combine(&x0, alpha_t, &eps, sigma_t, None)?,
        pred_original_sample: x0,
    })
}

#[cfg(test)]
mod tests {
    use super::super::ddim::ddim_step;
    use super::super::sampler::Sampler;
    use super::super::step::MultistepState;
    use super::super::testing::*;
    use super::*;

    /// Euler and DDIM (eta 0) agree step by step where both end at alpha_bar = 1.
    #[test]
    fn euler_agrees_with_ddim_eta_zero() {
        let s = schedule(12, true, true);
        let mut x_euler = tensor(&[0.9, -1.2, 0.3]);
        let mut x_ddim = x_euler.clone();
        for index in 0..12 {
            // Any model output will do; the same for both.
            let v = (&x_euler * 0.5).unwrap().affine(1.0, 0.1 * index as f64).unwrap();
            let input = StepInput {
                schedule: &s,
                index,
                sample: &x_euler,
                model_output: &v,
            };
            let ours = super::super::sampler::step(
                Sampler::Euler,
                &input,
                &v_params(),
                &mut MultistepState::default(),
                None,
            )
            .unwrap();
            let ddim = ddim_step(&s, index, &x_ddim, &v, &v_params(), None).unwrap();
            assert_close(&ours.prev_sample, &ddim.prev_sample, 1e-6, "Euler vs DDIM");
            x_euler = ours.prev_sample;
            x_ddim = ddim.prev_sample;
        }
    }

    /// The VP form equals k-diffusion's sigma-space step where sigma is finite (stock SD schedule).
    #[test]
    fn vp_form_equals_the_sigma_space_step() {
        let s = schedule(10, false, false);
        let (x, out) = (0.8f64, -0.4f64);
        for index in 0..10 {
            let (a, a_next) = (
                s.alpha_cumprod(index),
                if index + 1 < 10 {
                    s.prev_alpha_cumprod(index)
                } else {
                    1.0
                },
            );
            // k-diffusion: x_k = x / alpha, x0 from v, d = (x_k - x0) / sigma_k.
            let (sk, sk_next) = (((1.0 - a) / a).sqrt(), ((1.0 - a_next) / a_next).sqrt());
            let x0 = a.sqrt() * x - (1.0 - a).sqrt() * out;
            let xk = x / a.sqrt();
            let expected = (xk + (sk_next - sk) * (xk - x0) / sk) * a_next.sqrt();
            let input = StepInput {
                schedule: &s,
                index,
                sample: &tensor(&[x as f32]),
                model_output: &tensor(&[out as f32]),
            };
            let got = values(&step(&input, Prediction::VPrediction).unwrap().prev_sample)[0];
            assert!(
                (got as f64 - expected).abs() < 1e-5,
                "step {index}: {got} vs {expected}"
            );
        }
    }

    /// A v-model that returns the v of a known x0 gives x0 back from t = T: in one step, and at
    /// the end of a 10-step run.
    #[test]
    fn exact_from_t_max_with_a_perfect_v_model() {
        let (x_t, x0) = (tensor(&[1.3, -0.7]), tensor(&[0.25, -0.5]));
        for steps in [1, 10] {
            let s = schedule(steps, true, false);
            assert_eq!(s.alpha_cumprod(0), 0.0);
            let (last, estimates) = run_perfect(Sampler::Euler, &s, &x_t, &x0, &x_t);
            assert_close(&estimates[0], &x0, 1e-6, "x0 at t = T");
            assert_close(&last, &x0, 1e-5, "final sample");
        }
    }
}
