//! The GELU activations of the UNet's feed-forward (GEGLU) and of CLIP on the CPU in f32, as
//! candle custom ops: one fused pass of our vectorised math (candle's `gelu_erf` calls libm's
//! scalar `erff` per element).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::kernels::cpu_math;
use crate::kernels::cpu_op::contiguous_f32;

/// The exact (erf) GELU of `xs`, f32 on the CPU (made contiguous).
pub fn gelu_erf(xs: &Tensor) -> Result<Tensor> {
    xs.contiguous()?.apply_op1_no_bwd(&CpuGelu)
}

/// diffusers' GEGLU of `projected`, f32 on the CPU (made contiguous): the last dimension halves
/// into value and gate, `value * gelu_erf(gate)`.
pub fn geglu(projected: &Tensor) -> Result<Tensor> {
    projected.contiguous()?.apply_op1_no_bwd(&CpuGeglu)
}

/// Elements per parallel task.
const CHUNK: usize = 16_384;

struct CpuGelu;

impl CustomOp1 for CpuGelu {
    fn name(&self) -> &'static str {
        "sdfix-gelu-erf"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let xs = contiguous_f32(storage, layout, "activation")?;
        // Filled in place, not zeroed first: every element is written.
        let mut out: Vec<f32> = Vec::with_capacity(xs.len());
        out.spare_capacity_mut()[..xs.len()]
            .par_chunks_mut(CHUNK)
            .zip(xs.par_chunks(CHUNK))
            .for_each(|(dst, src)| cpu_math::gelu_slice(dst, src));
        // SAFETY: the chunks above wrote all xs.len() elements.
        unsafe { out.set_len(xs.len()) };
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// One pass over value and gate (the generic path is a chunk copy, a GELU and a product).
struct CpuGeglu;

impl CustomOp1 for CpuGeglu {
    fn name(&self) -> &'static str {
        "sdfix-geglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let xs = contiguous_f32(storage, layout, "activation")?;
        let mut dims = layout.shape().dims().to_vec();
        let Some(last) = dims.last_mut() else {
            candle_core::bail!("geglu: scalar input")
        };
        if *last % 2 != 0 {
            candle_core::bail!("geglu: the last dimension ({last}) must be even")
        }
        let hidden = *last / 2;
        *last = hidden;
        let len = xs.len() / 2;
        let mut out: Vec<f32> = Vec::with_capacity(len);
        if hidden > 0 {
            out.spare_capacity_mut()[..len]
                .par_chunks_mut(hidden)
                .zip(xs.par_chunks(2 * hidden))
                .for_each(|(dst, src)| cpu_math::geglu(dst, &src[..hidden], &src[hidden..]));
            // SAFETY: one output row of `hidden` per input row of 2 * hidden: all len elements.
            unsafe { out.set_len(len) };
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// diffusers' GEGLU as candle ops, on any device and dtype: [`crate::model::activation::geglu`]'s
/// fallback, and the reference of the CUDA kernel's checks ([`super::cuda::parity`]).
pub fn composite_geglu(projected: &Tensor) -> Result<Tensor> {
    let chunks = projected.chunk(2, candle_core::D::Minus1)?;
    &chunks[0] * chunks[1].gelu_erf()?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu_op::max_abs_diff;
    use candle_core::{DType, Device};

    #[test]
    fn fused_paths_match_candle() {
        let dev = Device::Cpu;
        let xs = (Tensor::randn(0f32, 2., (3, 5, 40), &dev).unwrap())
            .contiguous()
            .unwrap();
        assert!(max_abs_diff(&gelu_erf(&xs).unwrap(), &xs.gelu_erf().unwrap()) < 1e-5);
        let chunks = xs.chunk(2, 2).unwrap();
        let expected = (&chunks[0] * chunks[1].gelu_erf().unwrap()).unwrap();
        assert!(max_abs_diff(&geglu(&xs).unwrap(), &expected) < 1e-5);
        assert!(geglu(&Tensor::zeros((2, 3), DType::F32, &dev).unwrap()).is_err());
    }
}
