//! The paper's math on tensors: what the network predicts and how to turn it into x0 and eps
//! ([`prediction`]), the samplers ([`sampler`] chooses and dispatches, [`step`] holds what every step takes and gives; one file each: [`ddim`],
//! [`euler`], [`euler_a`], [`dpmpp_2m`], [`dpmpp_2m_sde`], [`unipc`]), classifier-free guidance and its
//! rescale ([`guidance`], Section 3.4), the seeded initial and per-step noise ([`noise`]), and latent resizing as torch's
//! `F.interpolate` ([`upscale`], the hires fix's).
//! Schedules come in as plain data ([`crate::schedule::Schedule`]); nothing here loads a model or
//! knows about prompts.

pub mod ddim;
pub mod dpmpp_2m;
pub mod dpmpp_2m_sde;
pub mod euler;
pub mod euler_a;
pub mod guidance;
pub mod noise;
pub mod prediction;
pub mod sampler;
pub mod step;
#[cfg(test)]
mod testing;
pub mod unipc;
pub mod upscale;

pub use prediction::Prediction;
pub use sampler::Sampler;
