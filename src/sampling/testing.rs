//! Helpers for the samplers' unit tests: SD's schedule and a "model" that knows x0.

use candle_core::{Device, Tensor};

use super::prediction::Prediction;
use super::sampler::{step, Sampler};
use super::step::{MultistepState, StepInput, StepParams};
use crate::schedule::{BetaSource, Schedule, ScheduleSpec, TimestepSpacing};

pub fn schedule(steps: usize, zero_terminal_snr: bool, set_alpha_to_one: bool) -> Schedule {
    Schedule::new(&ScheduleSpec {
        betas: BetaSource::STABLE_DIFFUSION,
        zero_terminal_snr,
        spacing: TimestepSpacing::Trailing,
        steps,
        steps_offset: 1,
        set_alpha_to_one,
    })
    .unwrap()
}

pub fn tensor(values: &[f32]) -> Tensor {
    Tensor::new(values, &Device::Cpu).unwrap()
}

pub fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

pub fn v_params() -> StepParams {
    StepParams {
        prediction: Prediction::VPrediction,
        eta: 0.0,
        clip_sample_range: None,
    }
}

/// The v a perfect model returns for `x` at alpha_bar `a` when the clean sample is `x0`:
/// eps = (x - sqrt(a) x0) / sqrt(1 - a), v = sqrt(a) eps - sqrt(1 - a) x0; at a = 0, v = -x0.
pub fn perfect_v(x: &Tensor, x0: &Tensor, a: f64) -> Tensor {
    let eps = ((x - (x0 * a.sqrt()).unwrap()).unwrap() / (1.0 - a).sqrt()).unwrap();
    ((eps * a.sqrt()).unwrap() - (x0 * (1.0 - a).sqrt()).unwrap()).unwrap()
}

/// Runs `sampler` over `schedule` from `x_t` with the perfect v-model of `x0` (and `noise` at
/// every step); returns the final sample and each step's x0 estimate.
pub fn run_perfect(
    sampler: Sampler,
    schedule: &Schedule,
    x_t: &Tensor,
    x0: &Tensor,
    noise: &Tensor,
) -> (Tensor, Vec<Tensor>) {
    let mut x = x_t.clone();
    let mut history = MultistepState::default();
    let mut estimates = Vec::new();
    for index in 0..schedule.timesteps.len() {
        let v = perfect_v(&x, x0, schedule.alpha_cumprod(index));
        let input = StepInput {
            schedule,
            index,
            sample: &x,
            model_output: &v,
        };
        let out = step(sampler, &input, &v_params(), &mut history, Some(noise)).unwrap();
        estimates.push(out.pred_original_sample);
        x = out.prev_sample;
    }
    (x, estimates)
}

pub fn assert_close(got: &Tensor, expected: &Tensor, tolerance: f32, what: &str) {
    for (a, b) in values(got).iter().zip(values(expected)) {
        assert!((a - b).abs() <= tolerance, "{what}: {a} vs {b}");
    }
}
