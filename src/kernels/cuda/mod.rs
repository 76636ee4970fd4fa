//! Our own CUDA kernels (issue 32's levers), each behind its `SDFIX_CUDA_*` switch
//! ([`super::cuda_settings`]), off by default until a GPU run measures it; candle's ops otherwise.
//! The `.cu` files here are compiled to PTX by build.rs under the `cuda` feature only (the CPU
//! build and CI never need nvcc); the Rust side is compiled in every build so that the layers can
//! name it, and its CUDA half (`cuda_fwd`) only under the feature.
//!
//! - [`attention`] (lever 3): flash-style attention on tensor cores, f16/bf16, head dims
//!   40/64/80/160, reading and writing the callers' (b, tokens, heads * d) layout.
//! - [`fused`] (lever 4): group norm (+ SiLU) and GEGLU, f32/f16/bf16 data, f32 sums.
//! - [`cudnn_conv`] (lever 2, `cudnn` builds): convolution on cuDNN with cached plans, one
//!   workspace, tensor-op math and the bias fused.
//! - [`graph`] (lever 5): the UNet forward captured as a CUDA graph per shape and replayed.
//! - [`parity`]: each kernel against candle's composite op and their times, for
//!   `sdfix kernel-check` (run by `scripts/gpu_check.sh`).
//!
//! Lever 6 (the VAE in bf16) is a dtype choice, in [`crate::model::vae::Vae::decode_dtype_on`].

pub mod attention;
pub mod cudnn_conv;
pub mod fused;
pub mod graph;
pub mod parity;

/// A contiguous input's values as a view from its start offset, or an error naming `what` (the
/// op, and which input): how every kernel here reads its inputs.
#[cfg(feature = "cuda")]
fn contiguous_view<'a, T>(
    slice: &'a candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
    layout: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    if !layout.is_contiguous() {
        candle_core::bail!("{what}: expected a contiguous input")
    }
    let start = layout.start_offset();
    Ok(slice.slice(start..start + layout.shape().elem_count()))
}

/// What a CUDA-only op answers on the CPU (the layers never send it there).
fn cuda_only(name: &str) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
    candle_core::bail!("{name} runs on CUDA only")
}

/// A kernel's output as candle's storage on `device`, with its shape.
#[cfg(feature = "cuda")]
fn output(
    slice: candle_core::cuda_backend::CudaStorageSlice,
    device: &candle_core::CudaDevice,
    shape: impl Into<candle_core::Shape>,
) -> (candle_core::CudaStorage, candle_core::Shape) {
    let storage = candle_core::CudaStorage {
        slice,
        device: device.clone(),
    };
    (storage, shape.into())
}
