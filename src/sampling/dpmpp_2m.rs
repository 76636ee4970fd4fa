//! DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2; diffusers' `DPMSolverMultistepScheduler` with
//! `algorithm_type="dpmsolver++"`, `solver_order=2`, `solver_type="midpoint"`,
//! `final_sigmas_type="zero"`; AUTOMATIC1111's "DPM++ 2M"), in the variance-preserving x0 form.
//!
//! DPM-Solver++ integrates the probability-flow ODE in lambda = log(alpha / sigma) (half the
//! log-SNR), with h = lambda_t - lambda_s and e = exp(-h). Its first-order step,
//! `x_t = (sigma_t / sigma_s) x_s - alpha_t (e - 1) x0`, is with x_s = alpha_s x0 + sigma_s eps
//! the same as `alpha_t x0 + sigma_t eps` (DDIM, eta 0). The second-order (midpoint) step adds
//! `0.5 alpha_t (1 - e) D1` with D1 = (x0 - x0_prev) / r and r = h_prev / h, the slope of x0 in
//! lambda estimated from the previous step's x0.
//!
//! **At zero terminal SNR** lambda_T = -inf, so the step out of t = T has no finite h. It is still
//! exact: the first-order solution integrates e^lambda from -inf, a convergent integral, and its
//! closed form above needs only alpha_t, sigma_t, x0 and eps (e = 0). The step after it would use
//! the history point at lambda_T: its h_prev is infinite, r = h_prev / h is infinite and D1 = 0, so
//! the correction vanishes in the limit and that step is first order too. We take exactly that
//! limit, and use the multistep history from the first finite lambda on. diffusers (alpha_bar_T =
//! 2^-24, lambda_T = -8.3) instead uses a D1 from x0 at t = T on the second step; with
//! `--terminal-alpha-bar diffusers` lambda_T is finite and sdfix does the same.
//!
//! As in diffusers, the first step (no history) and the last (to sigma = 0, h = inf) are first
//! order.

use candle_core::{Result, Tensor};

use super::prediction::{x0_and_eps, Prediction};
use super::step::{alpha_sigma, combine, exp_neg_h, lambda, MultistepState, StepInput, StepOutput};

/// The second-order correction `coefficient * D1` of a step from alpha_bar `a_s` to `a_t` whose
/// previous step started at `history`, or `None` where it is first order: no history, a history
/// point at lambda = -inf (D1 = 0 in the limit), or a step to sigma = 0.
pub(super) fn midpoint_d1(a_s: f64, a_t: f64, x0: &Tensor, history: &MultistepState) -> Result<Option<Tensor>> {
    let Some((a_prev, x0_prev)) = &history.previous else {
        return Ok(None);
    };
    let (lambda_prev, lambda_s, lambda_t) = (lambda(*a_prev), lambda(a_s), lambda(a_t));
    if !(lambda_prev.is_finite() && lambda_s.is_finite() && lambda_t.is_finite()) {
        return Ok(None);
    }
    let r = (lambda_s - lambda_prev) / (lambda_t - lambda_s);
    Ok(Some(((x0 - x0_prev)? / r)?))
}

/// One DPM-Solver++(2M) step; `history` holds the previous step's x0 and is updated.
pub fn step(input: &StepInput, prediction: Prediction, history: &mut MultistepState) -> Result<StepOutput> {
    let (a_s, a_t) = (input.alpha(), input.next_alpha());
    let (x0, eps) = x0_and_eps(input.sample, input.model_output, prediction, a_s)?;
    let (alpha_t, sigma_t) = alpha_sigma(a_t);
    let mut prev_sample = combine(&x0, alpha_t, &eps, sigma_t, None)?;
    if let Some(d1) = midpoint_d1(a_s, a_t, &x0, history)? {
        let e = exp_neg_h(a_s, a_t);
        prev_sample = (prev_sample + (d1 * (0.5 * alpha_t * (1.0 - e)))?)?;
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
    use super::super::testing::*;
    use super::*;

    /// diffusers' own formulas (`multistep_dpm_solver_second_order_update`, midpoint), in lambda
    /// and x, on a schedule where every lambda is finite.
    #[test]
    fn equals_the_lambda_form_where_lambda_is_finite() {
        let s = schedule(10, false, false);
        let mut x = 0.8f64;
        let mut x_ours = tensor(&[x as f32]);
        let mut history = MultistepState::default();
        let mut prev: Option<(f64, f64)> = None;
        for index in 0..9 {
            let out = -0.4 + 0.05 * index as f64;
            let (a_s, a_t) = (s.alpha_cumprod(index), s.prev_alpha_cumprod(index));
            let ((alpha_s, sigma_s), (alpha_t, sigma_t)) = (alpha_sigma(a_s), alpha_sigma(a_t));
            let m0 = alpha_s * x - sigma_s * out;
            let h = lambda(a_t) - lambda(a_s);
            let mut next = sigma_t / sigma_s * x - alpha_t * ((-h).exp() - 1.0) * m0;
            if let Some((a_p, m1)) = prev {
                let r0 = (lambda(a_s) - lambda(a_p)) / h;
                let d1 = (m0 - m1) / r0;
                next -= 0.5 * alpha_t * ((-h).exp() - 1.0) * d1;
            }
            prev = Some((a_s, m0));
            x = next;
            let input = StepInput {
                schedule: &s,
                index,
                sample: &x_ours,
                model_output: &tensor(&[out as f32]),
            };
            x_ours = step(&input, Prediction::VPrediction, &mut history).unwrap().prev_sample;
            let got = values(&x_ours)[0] as f64;
            assert!((got - x).abs() < 1e-5, "step {index}: {got} vs {x}");
        }
    }

    /// Out of alpha_bar_T = 0 the step is DDIM's and the next one is first order (D1 = 0 in the
    /// limit); from the third step on the history is used.
    #[test]
    fn history_starts_at_the_first_finite_lambda() {
        let s = schedule(6, true, false);
        let x0_t = tensor(&[0.3]);
        let mut history = MultistepState::default();
        assert!(
            midpoint_d1(s.alpha_cumprod(0), s.prev_alpha_cumprod(0), &x0_t, &history)
                .unwrap()
                .is_none()
        );
        history.previous = Some((s.alpha_cumprod(0), tensor(&[0.1])));
        assert!(
            midpoint_d1(s.alpha_cumprod(1), s.prev_alpha_cumprod(1), &x0_t, &history)
                .unwrap()
                .is_none()
        );
        history.previous = Some((s.alpha_cumprod(1), tensor(&[0.1])));
        assert!(
            midpoint_d1(s.alpha_cumprod(2), s.prev_alpha_cumprod(2), &x0_t, &history)
                .unwrap()
                .is_some()
        );
        // To sigma = 0 (after the last step) it is first order again.
        assert!(midpoint_d1(s.alpha_cumprod(5), 1.0, &x0_t, &history).unwrap().is_none());
    }

    #[test]
    fn exact_from_t_max_with_a_perfect_v_model() {
        let (x_t, x0) = (tensor(&[1.3, -0.7]), tensor(&[0.25, -0.5]));
        for steps in [1, 10] {
            let s = schedule(steps, true, false);
            let (last, estimates) = run_perfect(Sampler::DpmPp2m, &s, &x_t, &x0, &x_t);
            assert_close(&estimates[0], &x0, 1e-6, "x0 at t = T");
            assert_close(&last, &x0, 1e-5, "final sample");
        }
    }
}
