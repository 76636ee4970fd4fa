//! The networks, built from resolved configs on candle-nn (loading them is [`crate::weights`]'s
//! job).
//!
//! - [`stable_diffusion`]: the text encoder (tokenizer + CLIP) and the denoiser (UNet + VAE).
//! - [`unet`], [`clip`]: our UNet2DConditionModel and CLIP text transformer on candle-nn.
//! - [`vae`]: the VAE decoder, configured from vae/config.json.
//! - Live previews without the VAE: [`latent_rgb`] (A1111's "Approx cheap" linear map) and
//!   [`taesd`] (TAESD's decoder, diffusers' `AutoencoderTiny` layout).
//! - [`vae_tiling`]: the VAE decoded and encoded in tiles, as diffusers' `enable_tiling()`.
//! - [`tokenizer`]: CLIP BPE, ids equal to transformers' CLIPTokenizer.
//! - [`resnet`]: the resnet, down- and upsampling blocks the UNet and the VAE share.
//! - The thin layers the networks are built from: [`attention`] (the one attention function all
//!   of them use), [`conv`], [`norm`], [`linear`] and [`activation`] (GELU/GEGLU). Each decides
//!   which kernel runs (ours from [`crate::kernels`] for f32 on the CPU, candle's ops elsewhere)
//!   and times the call with [`crate::kernels::profile`]; none holds kernel code.
//!
//! # Training
//!
//! Our inference kernels have no backward. A layer therefore takes a path with one exactly
//! when its result would carry a gradient: when its weights are `Var`s (a network built from a
//! `VarMap`, [`crate::training`]) or its input already carries one (`Tensor::track_op`). On the
//! CPU in f32 that path is [`crate::kernels::grad`] for convolutions, linear layers and the norms
//! (our ops with their own backward); elsewhere, and for attention's softmax and the GELUs,
//! candle ops that all have one. Nothing global decides it, and inference, whose tensors never
//! track ops, keeps the fast path; `training_path_forward_equals_inference` in tests/finetune.rs
//! pins that both paths compute the same UNet and CLIP.

pub mod activation;
pub mod attention;
pub mod clip;
pub mod conv;
pub mod latent_rgb;
pub mod linear;
pub mod norm;
pub mod resnet;
pub mod stable_diffusion;
pub mod taesd;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod vae_tiling;

/// Whether `t` is f32 on the CPU: where our kernels (inference, and [`crate::kernels::grad`] for
/// training) run.
pub(crate) fn on_cpu_f32(t: &candle_core::Tensor) -> bool {
    t.dtype() == candle_core::DType::F32 && matches!(t.device(), candle_core::Device::Cpu)
}
