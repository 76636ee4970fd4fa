//! sdfix: Stable Diffusion 2.x with the fixes of Lin et al., "Common Diffusion Noise Schedules and
//! Sample Steps are Flawed" (WACV 2024).
//!
//! Data flows one way: `cli` -> `schedule` (pure f64 math) and `model` (files, configs);
//! `config` mirrors the diffusers JSON files.
//!
//! - [`schedule`]: betas, the zero terminal SNR rescale (Algorithm 1), timestep spacing (Table 2).
//! - [`config`]: serde mirrors of diffusers' config files.
//! - [`model`]: finding model files, locally or on the Hugging Face hub.
//! - [`kernels`]: the CPU kernels (candle custom ops) the model's layers call; the `unsafe` code.
//! - [`cli`]: the command line.

pub mod cli;
pub mod config;
pub mod device;
pub mod grid;
pub mod guidance;
pub mod kernels;
pub mod metadata;
pub mod model;
pub mod noise;
pub mod output;
pub mod pipeline;
pub mod progress;
pub mod prompts;
pub mod sampler;
pub mod schedule;
pub mod stats;
