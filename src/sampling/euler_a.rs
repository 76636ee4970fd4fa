//! Euler ancestral (k-diffusion `sample_euler_ancestral` with eta 1; diffusers'
//! `EulerAncestralDiscreteScheduler`; AUTOMATIC1111's "Euler a"), in the variance-preserving
//! x0 form.
//!
//! k-diffusion splits the step to sigma_k' into a deterministic Euler step down to
//! sigma_down = sigma_k'^2 / sigma_k and fresh noise of std sigma_up = sigma_k' sqrt(1 -
//! sigma_k'^2 / sigma_k^2). With e = sigma_k' / sigma_k = exp(-h) (`exp_neg_h`) that is, back in
//! VP form, `x' = alpha_t' x0 + sigma_t' (e eps + sqrt(1 - e^2) z)`: exactly DDIM with eta 1,
//! and finite at a zero-SNR t = T, where e = 0 and the step draws the whole noise afresh. The
//! noise z comes from the image's step stream ([`super::noise::ImageNoise::sample_step`]).

use candle_core::{Result, Tensor};

use super::prediction::{x0_and_eps, Prediction};
use super::step::{alpha_sigma, combine, exp_neg_h, StepInput, StepOutput};

/// One Euler-ancestral step with noise `z` (standard normal, shaped like the sample).
pub fn step(input: &StepInput, prediction: Prediction, z: &Tensor) -> Result<StepOutput> {
    let (a_s, a_t) = (input.alpha(), input.next_alpha());
    let (x0, eps) = x0_and_eps(input.sample, input.model_output, prediction, a_s)?;
    let (alpha_t, sigma_t) = alpha_sigma(a_t);
    let e = exp_neg_h(a_s, a_t);
    let fresh = sigma_t * (1.0 - e * e).max(0.0).sqrt();
    Ok(StepOutput {
        prev_sample: combine(&x0, alpha_t, &eps, sigma_t * e, Some((z, fresh)))?,
        pred_original_sample: x0,
    })
}

#[cfg(test)]
mod tests {
    use super::super::ddim::ddim_step;
    use super::super::sampler::Sampler;
    use super::super::step::StepParams;
    use super::super::testing::*;
    use super::*;

    /// k-diffusion's sigma-space step (get_ancestral_step, eta 1), on the stock SD schedule.
    #[test]
    fn vp_form_equals_the_sigma_space_step() {
        let s = schedule(10, false, false);
        let (x, out, z) = (0.8f64, -0.4f64, 0.6f64);
        for index in 0..9 {
            let (a, a_next) = (s.alpha_cumprod(index), s.prev_alpha_cumprod(index));
            let (sk, sk_next) = (((1.0 - a) / a).sqrt(), ((1.0 - a_next) / a_next).sqrt());
            let sigma_up = (sk_next * sk_next * (sk * sk - sk_next * sk_next) / (sk * sk)).sqrt();
            let sigma_down = (sk_next * sk_next - sigma_up * sigma_up).sqrt();
            let x0 = a.sqrt() * x - (1.0 - a).sqrt() * out;
            let xk = x / a.sqrt();
            let expected = (xk + (sigma_down - sk) * (xk - x0) / sk + z * sigma_up) * a_next.sqrt();
            let input = StepInput {
                schedule: &s,
                index,
                sample: &tensor(&[x as f32]),
                model_output: &tensor(&[out as f32]),
            };
            let got = values(
                &step(&input, Prediction::VPrediction, &tensor(&[z as f32]))
                    .unwrap()
                    .prev_sample,
            )[0];
            assert!(
                (got as f64 - expected).abs() < 1e-5,
                "step {index}: {got} vs {expected}"
            );
        }
    }

    /// Euler a is DDIM with eta 1, given the same noise.
    #[test]
    fn equals_ddim_eta_one() {
        let s = schedule(8, true, true);
        let x = tensor(&[0.9, -1.2]);
        let v = tensor(&[0.2, 0.4]);
        let z = tensor(&[-0.3, 1.1]);
        let eta_one = StepParams { eta: 1.0, ..v_params() };
        for index in 0..8 {
            let input = StepInput {
                schedule: &s,
                index,
                sample: &x,
                model_output: &v,
            };
            let ours = step(&input, Prediction::VPrediction, &z).unwrap();
            let ddim = ddim_step(&s, index, &x, &v, &eta_one, Some(&z)).unwrap();
            assert_close(&ours.prev_sample, &ddim.prev_sample, 1e-5, "Euler a vs DDIM eta 1");
        }
    }

    #[test]
    fn exact_from_t_max_with_a_perfect_v_model() {
        let (x_t, x0, z) = (tensor(&[1.3, -0.7]), tensor(&[0.25, -0.5]), tensor(&[0.4, 2.0]));
        for steps in [1, 10] {
            let s = schedule(steps, true, false);
            let (last, estimates) = run_perfect(Sampler::EulerAncestral, &s, &x_t, &x0, &z);
            assert_close(&estimates[0], &x0, 1e-6, "x0 at t = T");
            assert_close(&last, &x0, 1e-5, "final sample");
        }
    }
}
