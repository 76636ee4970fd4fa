//! Which sampler walks the schedule (`--sampler`), and the one dispatch from the pipeline's loop
//! to the chosen step.
//!
//! Every sampler here is written in the variance-preserving x0 form,
//! `x_t = alpha_t x0 + sigma_t eps` with `alpha_t = sqrt(a)`, `sigma_t = sqrt(1 - a)` and
//! `a = alpha_bar_t`, where the zero-SNR terminal `a = 0` is an ordinary number: from a
//! v-prediction at t = T, x0 = -v and eps = x exactly ([`super::prediction::x0_and_eps`]).
//! k-diffusion's and diffusers' Euler-type samplers work in sigma = sigma_t / alpha_t instead,
//! which is infinite there; they clamp alpha_bar_T (`--terminal-alpha-bar`).
//!
//! The non-DDIM samplers all end at sigma = 0 (alpha_bar = 1): their last step returns x0, as
//! k-diffusion and diffusers' `final_sigmas_type="zero"` do. DDIM keeps diffusers'
//! `set_alpha_to_one` rule (see [`super::ddim`]).

use std::fmt;
use std::str::FromStr;

use candle_core::{Result, Tensor};

use super::ddim::ddim_step;
use super::step::{MultistepState, StepInput, StepOutput, StepParams};
use super::{dpmpp_2m, dpmpp_2m_sde, euler, euler_a, unipc};

/// `--sampler`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Sampler {
    /// Song et al. 2021, the paper's sampler (Lin et al. 2024, Section 3.2).
    #[default]
    Ddim,
    /// Karras et al. 2022's Euler step (k-diffusion `sample_euler`).
    Euler,
    /// Euler with fresh noise at each step (k-diffusion `sample_euler_ancestral`, eta 1).
    EulerAncestral,
    /// DPM-Solver++(2M) (Lu et al. 2022), diffusers' `DPMSolverMultistepScheduler`.
    DpmPp2m,
    /// Its SDE variant (`algorithm_type="sde-dpmsolver++"`).
    DpmPp2mSde,
    /// UniPC (Zhao et al. 2023), diffusers' `UniPCMultistepScheduler` (bh2, with its corrector).
    UniPc,
}

impl Sampler {
    pub const ALL: [Sampler; 6] = [
        Self::Ddim,
        Self::Euler,
        Self::EulerAncestral,
        Self::DpmPp2m,
        Self::DpmPp2mSde,
        Self::UniPc,
    ];

    /// The name `--sampler` takes and images record.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler_a",
            Self::DpmPp2m => "dpmpp_2m",
            Self::DpmPp2mSde => "dpmpp_2m_sde",
            Self::UniPc => "unipc",
        }
    }

    /// The name AUTOMATIC1111 writes in its `parameters` (`Sampler: Euler a`).
    pub fn a1111_name(self) -> &'static str {
        match self {
            Self::Ddim => "DDIM",
            Self::Euler => "Euler",
            Self::EulerAncestral => "Euler a",
            Self::DpmPp2m => "DPM++ 2M",
            Self::DpmPp2mSde => "DPM++ 2M SDE",
            Self::UniPc => "UniPC",
        }
    }

    /// Whether each step adds fresh noise (drawn from the image's step stream,
    /// [`super::noise::ImageNoise::sample_step`]).
    pub fn is_stochastic(self) -> bool {
        matches!(self, Self::EulerAncestral | Self::DpmPp2mSde)
    }
}

impl fmt::Display for Sampler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Sampler {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|x| x.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|x| x.name()).collect();
            format!("unknown sampler {s:?}; expected {}", names.join(", "))
        })
    }
}

/// One step of `sampler` from `input.index` to the next timestep. `noise` (shaped like the
/// sample) is required by the stochastic samplers and by DDIM with eta > 0.
pub fn step(
    sampler: Sampler,
    input: &StepInput,
    params: &StepParams,
    history: &mut MultistepState,
    noise: Option<&Tensor>,
) -> Result<StepOutput> {
    if input.index >= input.schedule.timesteps.len() {
        candle_core::bail!(
            "step {} is past the schedule's {} steps",
            input.index,
            input.schedule.timesteps.len()
        );
    }
    let needs_noise =
        || noise.ok_or_else(|| candle_core::Error::Msg(format!("the {sampler} sampler needs per-step noise")));
    let output = match sampler {
        Sampler::Ddim => {
            return ddim_step(
                input.schedule,
                input.index,
                input.sample,
                input.model_output,
                params,
                noise,
            );
        }
        Sampler::Euler => euler::step(input, params.prediction)?,
        Sampler::EulerAncestral => euler_a::step(input, params.prediction, needs_noise()?)?,
        Sampler::DpmPp2m => dpmpp_2m::step(input, params.prediction, history)?,
        Sampler::DpmPp2mSde => dpmpp_2m_sde::step(input, params.prediction, history, needs_noise()?)?,
        Sampler::UniPc => unipc::step(input, params.prediction, history)?,
    };
    Ok(output)
}
