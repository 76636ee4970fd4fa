//! DPM-Solver++(2M) SDE (Lu et al. 2022, Appendix; diffusers' `DPMSolverMultistepScheduler` with
//! `algorithm_type="sde-dpmsolver++"`, midpoint, `final_sigmas_type="zero"`; AUTOMATIC1111's
//! "DPM++ 2M SDE"), in the variance-preserving x0 form.
//!
//! diffusers' first-order SDE step is
//! `x_t = (sigma_t / sigma_s) e x_s + alpha_t (1 - e^2) x0 + sigma_t sqrt(1 - e^2) z` with
//! e = exp(-h); with x_s = alpha_s x0 + sigma_s eps that is
//! `alpha_t x0 + sigma_t (e eps + sqrt(1 - e^2) z)` (so Euler a, [`super::euler_a`], is its first
//! order), finite out of a zero-SNR t = T where e = 0. The second order adds
//! `0.5 alpha_t (1 - e^2) D1`, with D1 as in [`super::dpmpp_2m`] and the same exact treatment of
//! lambda_T = -inf (first order out of t = T and on the step after it). The noise z comes from the
//! image's step stream ([`super::noise::ImageNoise::sample_step`]).

use candle_core::{Result, Tensor};

use super::dpmpp_2m::midpoint_d1;
use super::prediction::{x0_and_eps, Prediction};
use super::step::{alpha_sigma, combine, exp_neg_h, MultistepState, StepInput, StepOutput};

/// One DPM-Solver++(2M) SDE step with noise `z`; `history` is updated.
pub fn step(input: &StepInput, prediction: Prediction, history: &mut MultistepState, z: &Tensor) -> Result<StepOutput> {
    let (a_s, a_t) = (input.alpha(), input.next_alpha());
    let (x0, eps) = x0_and_eps(input.sample, input.model_output, prediction, a_s)?;
    let (alpha_t, sigma_t) = alpha_sigma(a_t);
    let e = exp_neg_h(a_s, a_t);
    let fresh = sigma_t * (1.0 - e * e).max(0.0).sqrt();
    let mut prev_sample = combine(&x0, alpha_t, &eps, sigma_t * e, Some((z, fresh)))?;
    if let Some(d1) = midpoint_d1(a_s, a_t, &x0, history)? {
        prev_sample = (prev_sample + (d1 * (0.5 * alpha_t * (1.0 - e * e)))?)?;
    }
    history.previous = Some((a_s, x0.clone()));
    Ok(StepOutput {
        prev_sample,
        pred_original_sample: x0,
    })
}

#[cfg(test)]
mod tests {
    use super::super::sampler::Sampler;
    use super::super::step::lambda;
    use super::super::testing::*;
    use super::*;

    /// diffusers' SDE formulas in lambda and x, where every lambda is finite.
    #[test]
    fn equals_the_lambda_form_where_lambda_is_finite() {
        let s = schedule(10, false, false);
        let mut x = 0.8f64;
        let mut x_ours = tensor(&[x as f32]);
        let mut history = MultistepState::default();
        let mut prev: Option<(f64, f64)> = None;
        for index in 0..9 {
            let (out, z) = (-0.4 + 0.05 * index as f64, 0.7 - 0.2 * index as f64);
            let (a_s, a_t) = (s.alpha_cumprod(index), s.prev_alpha_cumprod(index));
            let ((alpha_s, sigma_s), (alpha_t, sigma_t)) = (alpha_sigma(a_s), alpha_sigma(a_t));
            let m0 = alpha_s * x - sigma_s * out;
            let h = lambda(a_t) - lambda(a_s);
            let mut next = sigma_t / sigma_s * (-h).exp() * x
                + alpha_t * (1.0 - (-2.0 * h).exp()) * m0
                + sigma_t * (1.0 - (-2.0 * h).exp()).sqrt() * z;
            if let Some((a_p, m1)) = prev {
                let d1 = (m0 - m1) * h / (lambda(a_s) - lambda(a_p));
                next += 0.5 * alpha_t * (1.0 - (-2.0 * h).exp()) * d1;
            }
            prev = Some((a_s, m0));
            x = next;
            let input = StepInput {
                schedule: &s,
                index,
                sample: &x_ours,
                model_output: &tensor(&[out as f32]),
            };
            x_ours = step(&input, Prediction::VPrediction, &mut history, &tensor(&[z as f32]))
                .unwrap()
                .prev_sample;
            let got = values(&x_ours)[0] as f64;
            assert!((got - x).abs() < 1e-5, "step {index}: {got} vs {x}");
        }
    }

    #[test]
    fn exact_from_t_max_with_a_perfect_v_model() {
        let (x_t, x0, z) = (tensor(&[1.3, -0.7]), tensor(&[0.25, -0.5]), tensor(&[0.4, 2.0]));
        for steps in [1, 10] {
            let s = schedule(steps, true, false);
            let (last, estimates) = run_perfect(Sampler::DpmPp2mSde, &s, &x_t, &x0, &z);
            assert_close(&estimates[0], &x0, 1e-6, "x0 at t = T");
            assert_close(&last, &x0, 1e-5, "final sample");
        }
    }
}
