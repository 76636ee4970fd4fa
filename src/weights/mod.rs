//! Where weights come from: a diffusers-layout folder or a Hugging Face hub repo ([`files`]), the
//! built-in demo models ([`demo`]), safetensors read into our own buffers ([`safetensors_reader`]),
//! and the one loader every caller uses ([`loader`]): configs read once, each component's weight
//! file picked by dtype, every tensor name and shape checked.

pub mod demo;
pub mod files;
pub mod loader;
pub mod safetensors_reader;
