//! The networks, built from resolved configs on candle-nn (loading them is [`crate::weights`]'s
//! job).
//!
//! - [`stable_diffusion`]: the text encoder (tokenizer + CLIP) and the denoiser (UNet + VAE).
//! - [`unet`], [`clip`]: our UNet2DConditionModel and CLIP text transformer on candle-nn.
//! - [`vae`]: the VAE decoder, configured from vae/config.json.
//! - [`tokenizer`]: CLIP BPE, ids equal to transformers' CLIPTokenizer.
//! - [`resnet`]: the resnet, down- and upsampling blocks the UNet and the VAE share.
//! - The thin layers the networks are built from: [`attention`] (the one attention function all
//!   of them use), [`conv`], [`norm`], [`linear`] and [`activation`] (GELU/GEGLU). Each decides
//!   which kernel runs (ours from [`crate::kernels`] for f32 on the CPU, candle's ops elsewhere)
//!   and times the call with [`crate::kernels::profile`]; none holds kernel code.

pub mod activation;
pub mod attention;
pub mod clip;
pub mod conv;
pub mod linear;
pub mod norm;
pub mod resnet;
pub mod stable_diffusion;
pub mod tokenizer;
pub mod unet;
pub mod vae;
