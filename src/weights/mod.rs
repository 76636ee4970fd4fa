//! Where weights come from: a diffusers-layout folder or a Hugging Face hub repo ([`files`]),
//! single-file LDM checkpoints ([`single_file`], renamed by [`ldm_keys`], their prediction type
//! found by [`single_file::detect`], pickles checked by [`pickle_check`]), the built-in demo models
//! ([`demo`]), safetensors read into our own buffers ([`safetensors_reader`]), one weight file opened for a
//! module ([`weight_file`]), LoRA files merged
//! at load ([`lora`]), A1111's hashes ([`hash`]), the diffusers layout written back
//! ([`convert`]), a TAESD folder for live previews ([`taesd`]), and the one loader every caller uses ([`loader`]): configs read once, each
//! component's weight file picked by dtype, every tensor name and shape checked.

pub mod convert;
pub mod demo;
pub mod files;
pub mod hash;
pub mod ldm_keys;
pub mod ldm_write;
pub mod loader;
pub mod lora;
pub mod pickle_check;
pub mod safetensors_reader;
pub mod single_file;
pub mod taesd;
pub mod vae_file;
pub mod weight_file;
