//! The networks, built from resolved configs on candle-nn (loading them is [`crate::weights`]'s
//! job).
//!
//! - [`stable_diffusion`]: the text encoder (tokenizer + CLIP) and the denoiser (UNet + VAE).
//! - [`unet`], [`clip`]: our UNet2DConditionModel and CLIP text transformer on candle-nn.
//! - [`vae`]: the VAE decoder, configured from vae/config.json.
//! - [`tokenizer`]: CLIP BPE, ids equal to transformers' CLIPTokenizer.
//! - [`attention`]: the one attention function all of them use.
//! - [`conv`], [`norm`], [`linear`]: convolution, group norm and linear layers (our CPU kernels,
//!   candle's elsewhere); [`activation`]: GELU/GEGLU; [`cpu_math`]: the vectorised exp/erf they
//!   use; [`cpu_op`]: their shared plumbing; [`op_profile`]: time per kind of op (`bench --profile`).
//! - [`resnet`]: the resnet, down- and upsampling blocks the UNet and the VAE share.

pub mod activation;
pub mod attention;
pub mod clip;
pub mod conv;
pub mod cpu_math;
pub mod cpu_op;
pub mod linear;
pub mod norm;
pub mod op_profile;
pub mod resnet;
pub mod stable_diffusion;
pub mod tokenizer;
pub mod unet;
pub mod vae;
