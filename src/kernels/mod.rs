//! The crate's one unsafe room: everything below the model that needs `unsafe`, and nothing that
//! does not. `src/lib.rs` denies `unsafe_code` everywhere else (`#[allow(unsafe_code)]` on this
//! module alone), and clippy's `undocumented_unsafe_blocks` holds every `unsafe` block and impl
//! here to a `// SAFETY:` comment saying why it is sound (bounds, initialisation, lifetimes, which
//! task owns which elements). Three things live here, each because it needs `unsafe`:
//!
//! - the CPU kernels: our f32 implementations of the ops that dominate a Stable Diffusion step,
//!   each a candle custom op, whose `unsafe` is uninitialised output buffers, raw-pointer matrix
//!   products (the gemm crate) and outputs shared by parallel tasks;
//! - the host allocator ([`host_memory`]): the `GlobalAlloc` impl and its mmap'd arena;
//! - the CUDA runtime switches ([`cuda_settings`]): cudarc's unsafe event-tracking switch and raw
//!   calls into the CUDA driver.
//!
//! - the CUDA kernels of issue 32 ([`cuda`]): `.cu` files compiled to PTX by build.rs under the
//!   `cuda` feature, launched through cudarc; each behind an `SDFIX_CUDA_*` switch, candle's ops
//!   otherwise.
//!
//! The kernels know nothing of layers: they take tensors (and weights already laid out the way
//! they read them) and return tensors. The thin layers in [`crate::model`] decide when to call
//! them (f32 on the CPU) and when to call candle's ops instead, and time each call with
//! [`profile`].
//!
//! - [`conv`]: 2-D convolution as accumulated per-tap matrix products, no im2col.
//! - [`linear`]: `x @ W + b`, split over the thread pool.
//! - [`norm`]: group normalisation, optionally fused with SiLU.
//! - [`activation`]: the erf GELU and GEGLU.
//! - [`attention`]: flash-style multi-head attention.
//! - [`cpu_math`]: the vectorised exp/erf/softmax the kernels use.
//! - [`grad`]: the training path's convolution, linear, norms, attention and GELUs, with backward
//!   passes of our own (candle's were most of a training step), one file per op.
//! - [`cpu_op`]: their shared plumbing (candle-op wrappers, shared output pointer, transpose).
//! - [`profile`]: time per kind of op, for `bench --profile`.
//! - [`cuda`]: CUDA kernels of our own (fused group norm and GEGLU, bf16 VAE choice, cuDNN
//!   convolution, CUDA graphs) and `sdfix kernel-check`'s parity checks.
//! - [`cuda_settings`]: process-wide CUDA switches (TF32, event tracking, the memory pool's
//!   release threshold, the small-upload cache), each behind an environment variable.
//! - [`host_memory`]: the global allocator (mimalloc for small blocks, our own arena for blocks
//!   over 512 KiB) and its policy: freed memory kept while a phase computes, handed back to the
//!   OS between phases.

pub mod activation;
pub mod attention;
pub mod conv;
pub mod cpu_math;
pub mod cpu_op;
pub mod cuda;
pub mod cuda_settings;
pub mod grad;
pub mod host_memory;
pub mod linear;
pub mod norm;
pub mod profile;
