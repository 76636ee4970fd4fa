//! Lever 3 of issue 32: flash-style attention on CUDA tensor cores for f16 and bf16, head dims
//! 40, 64, 80 and 160 (`attention.cu`). The composite op materialises every (b, h, n, m) score in
//! f32 (671 MB for SD 2.1's 4096-token self-attention with CFG) and transposes q, k, v and the
//! output; this kernel keeps the scores in shared memory and reads and writes the callers'
//! (b, tokens, heads * d) layout. Numerics follow the composite's: f32 scores and softmax,
//! probabilities rounded to the data dtype for the product with v.
//!
//! Used by [`crate::model::attention::scaled_dot_product_attention`] on CUDA when
//! `SDFIX_CUDA_FLASH_ATTENTION=1`, for unmasked f16/bf16 attention with a supported head dim
//! ([`supports`]); other cases keep the composite op. Checked against the composite by
//! `sdfix kernel-check` ([`super::parity`]) on a GPU, and on the CPU through
//! `tests/cuda_emulation` (the same `.cu` source run with CUDA emulated).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// The head dims the kernel is instantiated for (`attention.cu`'s `SDFIX_FLASH_ATTENTION` lines).
pub const HEAD_DIMS: [usize; 4] = [40, 64, 80, 160];

/// Query rows per block (4 warps of 16) and threads per block, as in `attention.cu`.
const ROWS: usize = 64;
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const THREADS: u32 = 128;

/// Whether the kernel takes `dtype` data with heads of `head_dim`.
pub fn supports(dtype: DType, head_dim: usize) -> bool {
    matches!(dtype, DType::F16 | DType::BF16) && HEAD_DIMS.contains(&head_dim)
}

/// Dynamic shared memory per block for `head_dim`: `attention.cu`'s `Tile<D>::bytes` (the Q tile,
/// one K and one V tile of 16-bit values, and per warp its S and O rows in f32 and P rows in 16
/// bits, each row padded). `tests/cuda_emulation.rs` checks the two agree.
pub fn shared_memory_bytes(head_dim: usize) -> usize {
    let padded = head_dim.div_ceil(16) * 16;
    let keys_per_tile = if head_dim > 128 { 32 } else { 64 };
    let ld_half = padded + 8;
    let q = ROWS * ld_half * 2;
    let kv = keys_per_tile * ld_half * 2;
    let s = 16 * (keys_per_tile + 4) * 4;
    let p = 16 * (keys_per_tile + 8) * 2;
    let o = 16 * (padded + 4) * 4;
    q + 2 * kv + (ROWS / 16) * (s + p + o)
}

/// Attention of `query` (b, n, h*d) over `key`/`value` (b, m, h*d) with `heads` heads, scores
/// scaled by 1/sqrt(d), on CUDA; f16 or bf16 alike, `d` one of [`HEAD_DIMS`]. Inputs are made
/// contiguous. Returns (b, n, h*d).
pub fn flash_attention(query: &Tensor, key: &Tensor, value: &Tensor, heads: usize) -> Result<Tensor> {
    let (batch, _, inner) = query.dims3()?;
    let (key_batch, keys, key_inner) = key.dims3()?;
    if key.dims() != value.dims() || key_batch != batch || key_inner != inner || heads == 0 || inner % heads != 0 {
        candle_core::bail!(
            "flash attention: query {:?}, key {:?}, value {:?}, {heads} heads do not fit together",
            query.dims(),
            key.dims(),
            value.dims()
        )
    }
    if keys == 0 {
        candle_core::bail!("flash attention: no keys")
    }
    let op = FlashAttention { heads };
    query
        .contiguous()?
        .apply_op3_no_bwd(&key.contiguous()?, &value.contiguous()?, &op)
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct FlashAttention {
    heads: usize,
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "sdfix-cuda-flash-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        super::cuda_only(self.name())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        imp::flash_attention(self.heads, (s1, l1), (s2, l2), (s3, l3))
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use std::collections::HashSet;
    use std::sync::Mutex;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, Layout, Result, Shape};

    use super::super::contiguous_view;
    use super::{shared_memory_bytes, ROWS, THREADS};

    /// The PTX of `attention.cu` (compute_80), compiled by build.rs.
    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
    const MODULE: &str = "sdfix_attention";

    /// The kernels (per device) whose shared-memory limit was raised: above 48 KB it must be
    /// asked for, once per function.
    static RAISED: Mutex<Option<HashSet<String>>> = Mutex::new(None);

    /// A contiguous input's view from its start offset, 16-byte aligned (the kernel loads 8
    /// values at a time).
    fn aligned<'a, T>(slice: &'a CudaSlice<T>, layout: &Layout, what: &str) -> Result<CudaView<'a, T>> {
        if !layout.start_offset().is_multiple_of(8) {
            candle_core::bail!("flash attention: {what} must start on a 16-byte boundary")
        }
        contiguous_view(slice, layout, &format!("flash attention: {what}"))
    }

    struct Geometry {
        batch: usize,
        queries: usize,
        keys: usize,
        heads: usize,
        head_dim: usize,
    }

    fn launch<T: DeviceRepr>(
        dev: &CudaDevice,
        suffix: &str,
        (q, lq): (&CudaSlice<T>, &Layout),
        (k, lk): (&CudaSlice<T>, &Layout),
        (v, lv): (&CudaSlice<T>, &Layout),
        g: &Geometry,
    ) -> Result<CudaSlice<T>> {
        let q = aligned(q, lq, "query")?;
        let k = aligned(k, lk, "key")?;
        let v = aligned(v, lv, "value")?;
        let name = format!("sdfix_flash_attention_{suffix}_d{}", g.head_dim);
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let bytes = shared_memory_bytes(g.head_dim);
        {
            let mut raised = RAISED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let raised = raised.get_or_insert_with(HashSet::new);
            let key = format!("{:?}/{name}", dev.id());
            if !raised.contains(&key) {
                func.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
                .w()?;
                raised.insert(key);
            }
        }
        let n = g.batch * g.queries * g.heads * g.head_dim;
        // SAFETY: the kernel writes every output value: each (batch, head) block row covers all
        // queries, each query row all head_dim columns of its head.
        let mut out = unsafe { dev.alloc::<T>(n)? };
        let cfg = LaunchConfig {
            grid_dim: (g.queries.div_ceil(ROWS) as u32, (g.batch * g.heads) as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: bytes as u32,
        };
        let (heads, queries, keys) = (g.heads as i32, g.queries as i32, g.keys as i32);
        let scale_log2 = std::f32::consts::LOG2_E / (g.head_dim as f32).sqrt();
        let mut builder = func.builder();
        builder
            .arg(&q)
            .arg(&k)
            .arg(&v)
            .arg(&mut out)
            .arg(&heads)
            .arg(&queries)
            .arg(&keys)
            .arg(&scale_log2);
        // SAFETY: the arguments match the kernel's signature (q, k, v, out, heads, queries, keys,
        // scale_log2); q and out hold batch * queries * heads * head_dim values, k and v batch *
        // keys * heads * head_dim, all 16-byte aligned (checked above); the shared memory is the
        // kernel's own rule (it traps when given less).
        unsafe { builder.launch(cfg) }.w()?;
        Ok(out)
    }

    pub(super) fn flash_attention(
        heads: usize,
        (s1, l1): (&CudaStorage, &Layout),
        (s2, l2): (&CudaStorage, &Layout),
        (s3, l3): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let (batch, queries, inner) = l1.shape().dims3()?;
        let keys = l2.shape().dims3()?.1;
        let head_dim = inner / heads;
        if !super::HEAD_DIMS.contains(&head_dim) {
            candle_core::bail!(
                "flash attention: head dim {head_dim} is not one of {:?}",
                super::HEAD_DIMS
            )
        }
        if batch * heads > 65_535 || queries > i32::MAX as usize || keys > i32::MAX as usize {
            candle_core::bail!("flash attention: {batch} x {heads} heads, {queries} queries, {keys} keys is outside the kernel's range")
        }
        let geometry = Geometry {
            batch,
            queries,
            keys,
            heads,
            head_dim,
        };
        let dev = &s1.device;
        let slice = match (&s1.slice, &s2.slice, &s3.slice) {
            (CudaStorageSlice::F16(q), CudaStorageSlice::F16(k), CudaStorageSlice::F16(v)) => {
                CudaStorageSlice::F16(launch(dev, "f16", (q, l1), (k, l2), (v, l3), &geometry)?)
            }
            (CudaStorageSlice::BF16(q), CudaStorageSlice::BF16(k), CudaStorageSlice::BF16(v)) => {
                CudaStorageSlice::BF16(launch(dev, "bf16", (q, l1), (k, l2), (v, l3), &geometry)?)
            }
            _ => candle_core::bail!(
                "flash attention: query, key and value must all be f16 or all bf16, got {:?}, {:?}, {:?}",
                s1.dtype(),
                s2.dtype(),
                s3.dtype()
            ),
        };
        Ok(super::super::output(slice, dev, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supports_the_instantiated_head_dims_in_16_bit_types_only() {
        for d in HEAD_DIMS {
            assert!(supports(DType::F16, d) && supports(DType::BF16, d));
            assert!(!supports(DType::F32, d));
        }
        assert!(!supports(DType::F16, 128) && !supports(DType::F16, 512));
    }

    #[test]
    fn shared_memory_fits_an_sm80_block_and_is_16_byte_sized() {
        for d in HEAD_DIMS {
            let bytes = shared_memory_bytes(d);
            // sm_80 allows 163 KB of dynamic shared memory per block, sm_90 227 KB.
            assert!(bytes <= 163 * 1024 && bytes.is_multiple_of(16), "d{d}: {bytes}");
        }
    }

    #[test]
    fn runs_on_cuda_only() {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::zeros((1, 4, 64), DType::F16, &dev).unwrap();
        let err = flash_attention(&x, &x, &x, 1).unwrap_err().to_string();
        assert!(err.contains("CUDA only"), "{err}");
        let err = flash_attention(&x, &x.narrow(1, 0, 2).unwrap().narrow(2, 0, 32).unwrap(), &x, 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("do not fit"), "{err}");
    }
}
