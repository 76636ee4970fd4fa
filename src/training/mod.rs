//! `sdfix finetune`: the paper's training half (Lin et al. 2024, Sections 3.1-3.2). A model
//! trained on the stock schedule is fine-tuned on the schedule rescaled to zero terminal SNR with
//! the v-prediction loss; sampler-side fixes alone cannot make it draw true black or white.
//!
//! - [`objective`]: the zero-SNR schedule from the model's betas, x_t and the v target, the MSE.
//! - [`params`]: a component's weights as candle `Var`s (the networks built from them take the
//!   differentiable path, see [`crate::model`]'s "Training").
//! - [`adamw`]: PyTorch's AdamW and gradient-norm clipping; [`ema`]: the weight average.
//! - [`data`]: image folders and their captions, the VAE encoding; [`demo_data`]: `--data demo`.
//! - [`trainer`]: the loop, seeded batches, `train_log.jsonl`, resume; [`checkpoint`]: the model
//!   folder and checkpoints it writes.

pub mod adamw;
pub mod checkpoint;
pub mod data;
pub mod demo_data;
pub mod ema;
pub mod objective;
pub mod params;
pub mod trainer;

pub use trainer::{Batch, FinetuneSpec, Networks, Outcome, TrainEvent, Trainer};
