//! UniPC (Zhao et al. 2023) as diffusers' `UniPCMultistepScheduler` with its defaults for SD:
//! `predict_x0=True`, `solver_type="bh2"`, `solver_order=2`, `lower_order_final=True`, the
//! corrector on at every step, `final_sigmas_type="zero"`; in the variance-preserving x0 form.
//!
//! Each step first corrects the current sample with the model output just computed at it (UniC:
//! the previous step redone with the new x0 as an extra point), then predicts the next sample
//! from the corrected one (UniP; for order 2 with bh2 this is DPM-Solver++(2M)'s update, see
//! [`super::dpmpp_2m`]). Both use h = lambda_t - lambda_s in the half log-SNR lambda and the
//! first-order part `(sigma_t / sigma_s) x_s + alpha_t (1 - e) x0` with e = exp(-h).
//!
//! **At zero terminal SNR** (lambda_T = -inf) every quantity has a finite limit, and we take it:
//! e = 0 out of t = T, so the step from T is DDIM's, and the first corrector (order 1, rho = 1/2)
//! is `alpha_t (x0_T + x0_t) / 2 + sigma_t x_T`. Where a history point sits at lambda_T, its
//! ratio r = (lambda_T - lambda_s) / h is -inf: its difference term (m - m0) / r vanishes, and
//! the order-2 corrector's weights solve to rho_1 = 0 and rho_t = b_1. f64 arithmetic gives these
//! limits directly (1 / -inf = -0), so the code below has no special case for them; a step with
//! an infinite h is always of order 1 (the first step, and the last, to sigma = 0).

use candle_core::{Result, Tensor};

use super::prediction::{x0_and_eps, Prediction};
use super::step::{alpha_sigma, exp_neg_h, lambda, MultistepState, StepInput, StepOutput};

/// UniPC's solver order (diffusers' default for guided sampling is 2).
const SOLVER_ORDER: usize = 2;

/// bh2's weights b_1, b_2 for a step of size h (diffusers' loop over `factorial_i`, for order 2).
fn bh2_weights(h: f64) -> (f64, f64) {
    let hh = -h;
    let b_h = hh.exp_m1();
    let phi_1 = hh.exp_m1() / hh - 1.0;
    let phi_2 = phi_1 / hh - 0.5;
    (phi_1 / b_h, phi_2 * 2.0 / b_h)
}

/// `(sigma_t / sigma_s) x + alpha_t (1 - e) x0`: the first-order step from alpha_bar `a_s` to `a_t`
/// (finite at a_s = 0, where e = 0).
fn first_order(x: &Tensor, x0: &Tensor, a_s: f64, a_t: f64) -> Result<Tensor> {
    let ((_, sigma_s), (alpha_t, sigma_t)) = (alpha_sigma(a_s), alpha_sigma(a_t));
    let e = exp_neg_h(a_s, a_t);
    (x * (sigma_t / sigma_s))? + (x0 * (alpha_t * (1.0 - e)))?
}

/// (m_i - m0) / r_i with r_i = (lambda_i - lambda_0) / h: 0 where lambda_i = -inf.
fn difference(m_i: &Tensor, m0: &Tensor, r_i: f64) -> Result<Tensor> {
    (m_i - m0)? * (1.0 / r_i)
}

/// One UniPC step: correct `input.sample` with the new x0 (from the second step on), then predict
/// the next sample. `history` keeps the last two x0 estimates, the sample the previous
/// prediction started from and its order.
pub fn step(input: &StepInput, prediction: Prediction, history: &mut MultistepState) -> Result<StepOutput> {
    let index = input.index;
    let steps = input.schedule.timesteps.len();
    let (a, a_next) = (input.alpha(), input.next_alpha());
    let (x0, _) = x0_and_eps(input.sample, input.model_output, prediction, a)?;

    // UniC: redo the previous step (from a_s0 with m0) with x0 at this sample as an extra point.
    let mut sample = input.sample.clone();
    if let (Some(last_sample), Some((a_s0, m0))) = (&history.last_sample, &history.previous) {
        let (alpha_t, _) = alpha_sigma(a);
        let e = exp_neg_h(*a_s0, a);
        let mut corrected = first_order(last_sample, m0, *a_s0, a)?;
        let rho_t = match (&history.older, history.last_order) {
            (Some((a_s1, m1)), 2) => {
                let h = lambda(a) - lambda(*a_s0);
                let r1 = (lambda(*a_s1) - lambda(*a_s0)) / h;
                let (b1, b2) = bh2_weights(h);
                // R = [[1, 1], [r1, 1]], R rho = b.
                let rho_1 = (b1 - b2) / (1.0 - r1);
                corrected = (corrected + (difference(m1, m0, r1)? * (alpha_t * (1.0 - e) * rho_1))?)?;
                b1 - rho_1
            }
            _ => 0.5,
        };
        sample = (corrected + ((&x0 - m0)? * (alpha_t * (1.0 - e) * rho_t))?)?;
    }

    history.older = history.previous.take();
    history.previous = Some((a, x0.clone()));
    let order = SOLVER_ORDER.min(steps - index).min(index + 1);
    history.last_order = order;
    history.last_sample = Some(sample.clone());

    // UniP: predict from the corrected sample; order 2 adds the midpoint term with rho = 1/2.
    let mut prev_sample = first_order(&sample, &x0, a, a_next)?;
    if let (2, Some((a_s1, m1))) = (order, &history.older) {
        let h = lambda(a_next) - lambda(a);
        let r1 = (lambda(*a_s1) - lambda(a)) / h;
        let (alpha_t, _) = alpha_sigma(a_next);
        let e = exp_neg_h(a, a_next);
        prev_sample = (prev_sample + (difference(m1, &x0, r1)? * (alpha_t * (1.0 - e) * 0.5))?)?;
    }
    Ok(StepOutput {
        prev_sample,
        pred_original_sample: x0,
    })
}

#[cfg(test)]
mod tests {
    use super::super::sampler::Sampler;
    use super::super::testing::*;
    use super::*;

    /// diffusers' `step` / `multistep_uni_p_bh_update` / `multistep_uni_c_bh_update` transcribed
    /// for scalars in lambda, on a schedule where every lambda is finite.
    #[test]
    fn equals_diffusers_formulas_where_lambda_is_finite() {
        let steps = 8;
        let s = schedule(steps, false, false);
        let mut alphas: Vec<f64> = (0..steps).map(|i| s.alpha_cumprod(i)).collect();
        alphas.push(1.0);
        let (mut x, mut x_ours) = (0.8f64, tensor(&[0.8]));
        let mut history = MultistepState::default();
        let (mut outputs, mut last_sample, mut this_order): (Vec<f64>, Option<f64>, usize) = (vec![], None, 0);
        for i in 0..steps {
            let out = -0.4 + 0.07 * i as f64;
            let (alpha_i, sigma_i) = alpha_sigma(alphas[i]);
            let m = alpha_i * x - sigma_i * out;
            let lam = |k: usize| lambda(alphas[k]);
            if let Some(xl) = last_sample {
                let m0 = outputs[outputs.len() - 1];
                let (alpha_t, sigma_t) = alpha_sigma(alphas[i]);
                let (_, sigma_s0) = alpha_sigma(alphas[i - 1]);
                let h = lam(i) - lam(i - 1);
                let (b1, b2) = bh2_weights(h);
                let b_h = (-h).exp_m1();
                let x_t_ = sigma_t / sigma_s0 * xl - alpha_t * b_h * m0;
                let (rho_1, rho_t, d1) = if this_order == 2 {
                    let rk = (lam(i - 2) - lam(i - 1)) / h;
                    let rho_1 = (b1 - b2) / (1.0 - rk);
                    (rho_1, b1 - rho_1, (outputs[outputs.len() - 2] - m0) / rk)
                } else {
                    (0.0, 0.5, 0.0)
                };
                x = x_t_ - alpha_t * b_h * (rho_1 * d1 + rho_t * (m - m0));
            }
            outputs.push(m);
            this_order = 2usize.min(steps - i).min(i + 1);
            last_sample = Some(x);
            let (alpha_t, sigma_t) = alpha_sigma(alphas[i + 1]);
            let e = if alphas[i + 1] == 1.0 {
                0.0
            } else {
                (-(lam(i + 1) - lam(i))).exp()
            };
            let mut next = sigma_t / sigma_i * x + alpha_t * (1.0 - e) * m;
            if this_order == 2 {
                let h = lam(i + 1) - lam(i);
                let rk = (lam(i - 1) - lam(i)) / h;
                next -= alpha_t * (-h).exp_m1() * 0.5 * (outputs[outputs.len() - 2] - m) / rk;
            }
            x = next;
            let input = StepInput {
                schedule: &s,
                index: i,
                sample: &x_ours,
                model_output: &tensor(&[out as f32]),
            };
            x_ours = step(&input, Prediction::VPrediction, &mut history).unwrap().prev_sample;
            let got = values(&x_ours)[0] as f64;
            assert!((got - x).abs() < 1e-4, "step {i}: {got} vs {x}");
        }
    }

    #[test]
    fn exact_from_t_max_with_a_perfect_v_model() {
        let (x_t, x0) = (tensor(&[1.3, -0.7]), tensor(&[0.25, -0.5]));
        for steps in [1, 2, 10] {
            let s = schedule(steps, true, false);
            let (last, estimates) = run_perfect(Sampler::UniPc, &s, &x_t, &x0, &x_t);
            assert_close(&estimates[0], &x0, 1e-6, "x0 at t = T");
            assert_close(&last, &x0, 1e-5, "final sample");
        }
    }

    /// Out of alpha_bar_T = 0 no weight is NaN: a 10-step run with an imperfect model stays finite.
    #[test]
    fn finite_from_zero_terminal_snr() {
        let s = schedule(10, true, false);
        let (x_t, x0) = (tensor(&[1.3, -0.7]), tensor(&[0.25, -0.5]));
        let mut x = x_t.clone();
        let mut history = MultistepState::default();
        for index in 0..10 {
            let v = (perfect_v(&x, &x0, s.alpha_cumprod(index)) + 0.05 * index as f64).unwrap();
            let input = StepInput {
                schedule: &s,
                index,
                sample: &x,
                model_output: &v,
            };
            x = step(&input, Prediction::VPrediction, &mut history).unwrap().prev_sample;
            assert!(
                values(&x).iter().all(|v| v.is_finite()),
                "step {index}: {:?}",
                values(&x)
            );
        }
    }
}
