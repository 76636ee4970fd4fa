//! What our CPU custom ops (conv, norm, linear, attention, activation) share: reading a candle
//! storage as a contiguous f32 slice, and an output pointer that parallel tasks writing disjoint
//! parts of one buffer can share.

use candle_core::{CpuStorage, Layout, Result};

/// The f32 elements of a contiguous tensor; `op` names the caller in the error.
pub fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: tensors must be contiguous"),
    }
}

/// A raw pointer into an output buffer, shared by tasks that each write their own elements.
#[derive(Clone, Copy)]
pub struct SharedOut(*mut f32);

// SAFETY: callers give each task a disjoint set of elements, and keep the buffer alive (and
// unmoved) until the parallel loop ends.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub fn new(buffer: &mut [f32]) -> Self {
        Self(buffer.as_mut_ptr())
    }

    /// By method, so closures capture the whole (Send) wrapper, not the raw pointer field.
    pub fn ptr(self) -> *mut f32 {
        self.0
    }
}
