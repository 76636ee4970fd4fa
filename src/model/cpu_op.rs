//! What our CPU custom ops (conv, norm, linear, attention, activation) share: reading a candle
//! storage as a contiguous f32 slice, the candle-op wrapper for kernels with a weight and an
//! optional bias, and an output pointer that parallel tasks writing disjoint parts of one buffer
//! can share.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// The f32 elements of a contiguous tensor; `op` names the caller in the error.
pub fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: tensors must be contiguous"),
    }
}

/// A CPU kernel over an input, a weight and an optional bias, all contiguous f32 (conv, linear).
pub trait WeightedKernel: Send + Sync {
    /// The op's name in candle and in errors.
    const NAME: &'static str;

    /// Returns the output's elements and shape.
    fn run(
        &self,
        input: (&[f32], &Layout),
        weight: (&[f32], &Layout),
        bias: Option<&[f32]>,
    ) -> Result<(Vec<f32>, Shape)>;
}

/// Runs `kernel` on `xs` (made contiguous), `weight` and `bias` as one candle op.
pub fn apply_weighted<K: WeightedKernel>(
    kernel: K,
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let xs = xs.contiguous()?;
    let op = Weighted(kernel);
    match bias {
        Some(bias) => xs.apply_op3_no_bwd(weight, bias, &op),
        None => xs.apply_op2_no_bwd(weight, &op),
    }
}

/// A [`WeightedKernel`] as a candle op: two operands without a bias, three with one.
struct Weighted<K>(K);

impl<K: WeightedKernel> Weighted<K> {
    fn call(
        &self,
        (xs, xs_l): (&CpuStorage, &Layout),
        (w, w_l): (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let input = (contiguous_f32(xs, xs_l, K::NAME)?, xs_l);
        let weight = (contiguous_f32(w, w_l, K::NAME)?, w_l);
        let bias = bias.map(|(b, l)| contiguous_f32(b, l, K::NAME)).transpose()?;
        let (out, shape) = self.0.run(input, weight, bias)?;
        Ok((CpuStorage::F32(out), shape))
    }
}

impl<K: WeightedKernel> CustomOp2 for Weighted<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.call((s1, l1), (s2, l2), None)
    }
}

impl<K: WeightedKernel> CustomOp3 for Weighted<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.call((s1, l1), (s2, l2), Some((s3, l3)))
    }
}

/// max |a - b| over all elements (unit tests of the kernels).
#[cfg(test)]
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .expect("same shapes, f32")
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
