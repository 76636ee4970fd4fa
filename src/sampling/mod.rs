//! The paper's math on tensors: what the network predicts and how to turn it into x0 and eps
//! ([`prediction`]), the sampler step ([`ddim`], one file per sampler), classifier-free guidance
//! and its rescale ([`guidance`], Section 3.4), and the seeded initial and per-step noise
//! ([`noise`]). Schedules come in as plain data ([`crate::schedule::Schedule`]); nothing here loads
//! a model or knows about prompts.

pub mod ddim;
pub mod guidance;
pub mod noise;
pub mod prediction;

pub use prediction::Prediction;
