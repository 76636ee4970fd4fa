//! sdfix: Stable Diffusion 2.x with the fixes of Lin et al., "Common Diffusion Noise Schedules and
//! Sample Steps are Flawed" (WACV 2024): zero terminal SNR, v-prediction, trailing timesteps and
//! rescaled classifier-free guidance.
//!
//! Data flows one way: front-ends ([`cli`], [`serve`]) -> [`engine`] -> [`pipeline`] ->
//! {[`sampling`], [`model`]} -> [`kernels`]; [`sampling`] -> [`schedule`]; [`config`] -> [`schedule`]
//! (a scheduler config resolves into its types); [`weights`] -> {[`model`], [`config`]} (it builds
//! the networks from their configs); [`output`] writes what the engine returns. `schedule` and
//! `config` never touch candle; `engine` and `pipeline` write no files; no module imports one
//! that imports it back (tests/architecture.rs checks all three, and that no file in src/ is
//! over 800 lines).
//!
//! - [`cli`]: the command line, one file (or folder: `ablate/`) per subcommand, shared flag
//!   groups in `cli::args`, prompt files, progress output and luminance statistics.
//! - [`serve`]: `sdfix serve`, AUTOMATIC1111's HTTP API and a web page in front of one engine
//!   thread with a bounded queue.
//! - [`engine`]: a model opened once; the one settings type ([`engine::Request`]), its
//!   all-optional form every other source applies ([`engine::Overrides`]) and the error that
//!   names a setting ([`engine::RequestError`]); requests checked into jobs, batched by a typed
//!   key, made into images in memory and handed to an observer; img2img's pictures and masks in
//!   pixel space.
//! - [`pipeline`]: one batch: the denoising loop (with a per-step hook and inpainting's blend or
//!   extra channels) and the decode.
//! - [`sampling`]: prediction conversions, the samplers (DDIM, Euler, Euler a, DPM++ 2M and its
//!   SDE, UniPC) and what their steps share, CFG and its rescale, seeded noise.
//! - [`schedule`]: pure f64: betas, the zero terminal SNR rescale (Algorithm 1), timestep
//!   spacing (Table 2), noise-level ramps, the `Schedule` a sampler walks.
//! - [`config`]: serde mirrors of diffusers' config files.
//! - [`prompt`]: A1111's prompt language: emphasis and `BREAK` parsed, 77-token chunks with the
//!   comma backtrack, the emphasis modes on any encoder's hidden states, chunks joined. A leaf:
//!   it imports no other module (`model`'s tokenizer implements its `PromptTokenizer`).
//! - [`model`]: the networks (UNet, CLIP, VAE decoder and encoder, tokenizer, TAESD and the approx-cheap
//!   preview map) and thin layers that pick a kernel.
//! - [`kernels`]: the crate's only unsafe code: the CPU kernels (inference and gradients), the
//!   host allocator, the CUDA runtime switches; per-op profiling.
//! - [`weights`]: model folders and the hub, single-file LDM checkpoints (renames, synthesised
//!   configs, prediction-type detection, checked pickles), LoRA merged at load, A1111 hashes,
//!   `convert`, the built-in demo models, the safetensors reader, the one loader.
//! - [`output`]: PNG names and atomic writes, metadata chunks, the manifest, grids.
//! - [`device`]: `--device` and `--dtype`.
//! - [`training`]: `sdfix finetune`, the paper's training half: zero-SNR v-prediction fine-tuning
//!   through candle's autograd (a front-end beside the engine: it writes checkpoints and models).
//!
//! As a library: open a model, make three images, read their pixels and settings.
//!
//! ```
//! use sdfix::device::{self, DeviceChoice};
//! use sdfix::engine::{Engine, Request};
//!
//! # fn main() -> anyhow::Result<()> {
//! let (device, dtype) = device::resolve(DeviceChoice::Cpu, None)?;
//! let mut engine = Engine::open("demo", None, &device, dtype)?;
//! let jobs = [1, 2, 3]
//!     .map(|seed| engine.job(Request { seed, steps: 10, ..Request::new("solid black background") }))
//!     .into_iter()
//!     .collect::<Result<Vec<_>, _>>()?;
//! for image in engine.generate(&jobs)? {
//!     assert_eq!(image.rgb.len(), image.width * image.height * 3);
//!     println!("{}x{} {}", image.width, image.height, image.settings.a1111_parameters());
//! }
//! # Ok(())
//! # }
//! ```

// Unsafe code lives in `kernels` alone (allowed on its `mod` line below), each block with a
// `// SAFETY:` comment that clippy checks.
#![deny(unsafe_code)]
#![warn(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

pub mod cli;
pub mod config;
pub mod device;
pub mod engine;
#[allow(unsafe_code)]
pub mod kernels;
pub mod model;
pub mod output;
pub mod pipeline;
pub mod prompt;
pub mod sampling;
pub mod schedule;
pub mod serve;
pub mod training;
pub mod weights;
