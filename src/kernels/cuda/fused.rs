//! Lever 4 of issue 32: fused group norm (+ SiLU) and GEGLU on CUDA, for f32, f16 and bf16 data
//! with every sum in f32 (`fused.cu`). candle's composite group norm is about ten kernel launches
//! (dtype casts, two means, subtract, square, sqrt, divide, scale, shift, then the SiLU) and its
//! GEGLU four (chunk copies, GELU, product); the UNet calls them about 60 and 16 times a step, the
//! VAE 30 times at up to 512x512x128. Here: two launches for a group norm, one for a GEGLU.
//!
//! Used by [`crate::model::norm::GroupNorm`] and [`crate::model::activation::geglu`] on CUDA when
//! `SDFIX_CUDA_FUSED_NORM=1` ([`super::super::cuda_settings`]); checked against candle's composite
//! ops by `sdfix kernel-check` ([`super::parity`]).

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};

/// `silu?(group_norm(xs))` for `xs` (b, c, ...) on CUDA (made contiguous), `weight` and `bias`
/// (c) in the same dtype; statistics over each of `groups` groups of channels and all positions.
pub fn group_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, groups: usize, eps: f64, silu: bool) -> Result<Tensor> {
    let op = CudaGroupNorm { groups, eps, silu };
    xs.contiguous()?
        .apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &op)
}

/// diffusers' GEGLU of `projected` on CUDA (made contiguous): the last dimension halves into value
/// and gate, `value * gelu_erf(gate)`.
pub fn geglu(projected: &Tensor) -> Result<Tensor> {
    projected.contiguous()?.apply_op1_no_bwd(&CudaGeglu)
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct CudaGroupNorm {
    groups: usize,
    eps: f64,
    silu: bool,
}

impl CustomOp3 for CudaGroupNorm {
    fn name(&self) -> &'static str {
        "sdfix-cuda-group-norm"
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
        imp::group_norm(self, (s1, l1), (s2, l2), (s3, l3))
    }
}

struct CudaGeglu;

impl CustomOp1 for CudaGeglu {
    fn name(&self) -> &'static str {
        "sdfix-cuda-geglu"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        super::cuda_only(self.name())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        imp::geglu(storage, layout)
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, Layout, Result, Shape};

    use super::super::contiguous_view;
    use super::CudaGroupNorm;

    /// The PTX of `fused.cu` (compute_80), compiled by build.rs.
    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
    const MODULE: &str = "sdfix_fused";
    const THREADS: u32 = 256;
    /// Values per block the group norm aims at, and the most chunks one group is split into
    /// (`gn_apply` merges them all in one thread).
    const CHUNK_TARGET: usize = 8192;
    const MAX_CHUNKS: usize = 64;

    /// The geometry of one group norm call.
    struct Geometry {
        groups: usize,
        group_len: usize,
        positions: usize,
        channels_per_group: usize,
        chunks: usize,
        chunk_len: usize,
        batch_groups: usize,
    }

    #[allow(clippy::too_many_arguments)]
    fn launch_group_norm<T: DeviceRepr>(
        dev: &CudaDevice,
        suffix: &str,
        (x, lx): (&CudaSlice<T>, &Layout),
        (w, lw): (&CudaSlice<T>, &Layout),
        (b, lb): (&CudaSlice<T>, &Layout),
        g: &Geometry,
        eps: f32,
        silu: bool,
    ) -> Result<CudaSlice<T>> {
        let x = contiguous_view(x, lx, "group norm")?;
        let w = contiguous_view(w, lw, "group norm")?;
        let b = contiguous_view(b, lb, "group norm")?;
        let n = g.batch_groups * g.group_len;
        let mut partials = dev.alloc_zeros::<f32>(3 * g.batch_groups * g.chunks)?;
        // SAFETY: every element is written by gn_apply (the chunks cover each group).
        let mut y = unsafe { dev.alloc::<T>(n)? };
        let cfg = LaunchConfig {
            grid_dim: (g.chunks as u32, g.batch_groups as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (group_len, chunk_len, positions) = (g.group_len as i64, g.chunk_len as i64, g.positions as i64);
        let (channels_per_group, groups, silu) = (g.channels_per_group as i32, g.groups as i32, i32::from(silu));

        let stats = dev.get_or_load_custom_func(&format!("sdfix_gn_stats_{suffix}"), MODULE, PTX)?;
        let mut builder = stats.builder();
        builder.arg(&x).arg(&mut partials).arg(&group_len).arg(&chunk_len);
        // SAFETY: the arguments match gn_stats' signature (x, partials, group_len, chunk_len);
        // x holds batch_groups * group_len values, partials 3 per (group, chunk) of the grid.
        unsafe { builder.launch(cfg) }.w()?;

        let apply = dev.get_or_load_custom_func(&format!("sdfix_gn_apply_{suffix}"), MODULE, PTX)?;
        let mut builder = apply.builder();
        builder
            .arg(&x)
            .arg(&w)
            .arg(&b)
            .arg(&partials)
            .arg(&mut y)
            .arg(&group_len)
            .arg(&chunk_len)
            .arg(&positions)
            .arg(&channels_per_group)
            .arg(&groups)
            .arg(&eps)
            .arg(&silu);
        // SAFETY: the arguments match gn_apply's signature; weight and bias hold the
        // groups * channels_per_group channels the kernel indexes, y as many values as x.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(y)
    }

    pub(super) fn group_norm(
        op: &CudaGroupNorm,
        (s1, l1): (&CudaStorage, &Layout),
        (s2, l2): (&CudaStorage, &Layout),
        (s3, l3): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let dims = l1.shape().dims();
        if dims.len() < 2 {
            candle_core::bail!("group norm: expected (batch, channels, ...), got {dims:?}")
        }
        let (batch, channels) = (dims[0], dims[1]);
        let groups = op.groups;
        if groups == 0
            || !channels.is_multiple_of(groups)
            || l2.shape().elem_count() != channels
            || l3.shape().elem_count() != channels
        {
            candle_core::bail!(
                "group norm: {channels} channels, {} weights, {groups} groups",
                l2.shape().elem_count()
            )
        }
        let positions: usize = dims[2..].iter().product();
        let group_len = channels / groups * positions;
        let batch_groups = batch * groups;
        if batch_groups > 65_535 || group_len == 0 {
            candle_core::bail!(
                "group norm: {batch} x {groups} groups of {group_len} values is outside the CUDA kernel's range"
            )
        }
        let chunks = group_len.div_ceil(CHUNK_TARGET).clamp(1, MAX_CHUNKS);
        let geometry = Geometry {
            groups,
            group_len,
            positions,
            channels_per_group: channels / groups,
            chunks,
            chunk_len: group_len.div_ceil(chunks),
            batch_groups,
        };
        let dev = &s1.device;
        let eps = op.eps as f32;
        let slice = match (&s1.slice, &s2.slice, &s3.slice) {
            (CudaStorageSlice::F32(x), CudaStorageSlice::F32(w), CudaStorageSlice::F32(b)) => CudaStorageSlice::F32(
                launch_group_norm(dev, "f32", (x, l1), (w, l2), (b, l3), &geometry, eps, op.silu)?,
            ),
            (CudaStorageSlice::F16(x), CudaStorageSlice::F16(w), CudaStorageSlice::F16(b)) => CudaStorageSlice::F16(
                launch_group_norm(dev, "f16", (x, l1), (w, l2), (b, l3), &geometry, eps, op.silu)?,
            ),
            (CudaStorageSlice::BF16(x), CudaStorageSlice::BF16(w), CudaStorageSlice::BF16(b)) => {
                CudaStorageSlice::BF16(launch_group_norm(
                    dev,
                    "bf16",
                    (x, l1),
                    (w, l2),
                    (b, l3),
                    &geometry,
                    eps,
                    op.silu,
                )?)
            }
            _ => candle_core::bail!(
                "group norm: input, weight and bias must all be f32, f16 or bf16 alike, got {:?}, {:?}, {:?}",
                s1.dtype(),
                s2.dtype(),
                s3.dtype()
            ),
        };
        Ok(super::super::output(slice, dev, l1.shape().clone()))
    }

    fn launch_geglu<T: DeviceRepr>(
        dev: &CudaDevice,
        suffix: &str,
        x: &CudaSlice<T>,
        layout: &Layout,
        hidden: usize,
    ) -> Result<CudaSlice<T>> {
        let x = contiguous_view(x, layout, "geglu")?;
        let n = layout.shape().elem_count() / 2;
        // SAFETY: the grid-stride loop writes all n values.
        let mut y = unsafe { dev.alloc::<T>(n)? };
        if n == 0 {
            return Ok(y);
        }
        let blocks = n.div_ceil(THREADS as usize).min(65_535 * 8) as u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n, hidden) = (n as i64, hidden as i64);
        let func = dev.get_or_load_custom_func(&format!("sdfix_geglu_{suffix}"), MODULE, PTX)?;
        let mut builder = func.builder();
        builder.arg(&x).arg(&mut y).arg(&n).arg(&hidden);
        // SAFETY: the arguments match geglu's signature; x holds 2 n values, y n.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(y)
    }

    pub(super) fn geglu(storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let mut dims = layout.shape().dims().to_vec();
        let Some(last) = dims.last_mut() else {
            candle_core::bail!("geglu: scalar input")
        };
        if *last % 2 != 0 {
            candle_core::bail!("geglu: the last dimension ({last}) must be even")
        }
        let hidden = *last / 2;
        *last = hidden;
        let dev = &storage.device;
        let slice = match &storage.slice {
            CudaStorageSlice::F32(x) => CudaStorageSlice::F32(launch_geglu(dev, "f32", x, layout, hidden)?),
            CudaStorageSlice::F16(x) => CudaStorageSlice::F16(launch_geglu(dev, "f16", x, layout, hidden)?),
            CudaStorageSlice::BF16(x) => CudaStorageSlice::BF16(launch_geglu(dev, "bf16", x, layout, hidden)?),
            _ => candle_core::bail!("geglu: expected f32, f16 or bf16, got {:?}", storage.dtype()),
        };
        Ok(super::super::output(slice, dev, Shape::from(dims)))
    }
}
