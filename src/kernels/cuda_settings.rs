//! Process-wide CUDA settings (issue 16, lever 1), each behind an environment switch so that one
//! prepared GPU run can measure every one of them against the same baseline
//! (`scripts/gpu_check.sh`). Read from candle 0.11's and cudarc 0.19's sources:
//!
//! - `SDFIX_CUDA_TF32` (default 0): TF32 tensor cores for f32 matmuls
//!   (`candle_core::cuda::set_gemm_reduced_precision_f32`). Off by default because it changes f32
//!   results at the 1e-3 level, and `--dtype f32` is the parity mode; f16/bf16 are unaffected.
//! - `SDFIX_CUDA_EVENT_TRACKING` (default 0): cudarc records two CUDA events per buffer to order
//!   uses across streams. sdfix runs every op of a device on its one stream, so the events only
//!   cost host time (mistral.rs turns them off for diffusion the same way). Must happen before the
//!   first tensor is made: [`apply`] runs when the device is opened.
//! - `SDFIX_CUDA_KEEP_POOL` (default 1): the release threshold of the device's default memory pool
//!   (which candle's `cuMemAllocAsync` allocations come from) raised to the maximum, so memory freed
//!   inside a step is kept for the next one instead of being returned to the driver at every
//!   synchronise (PyTorch's caching allocator keeps it too).
//! - `SDFIX_CUDA_HTOD_CACHE` (default 1): candle's small-upload cache, held around each UNet
//!   forward ([`htod_cache_guard`]): the dims/strides every non-contiguous op uploads are the same
//!   from step to step and are copied device-to-device from a cache instead.
//!
//!
//! The levers of issue 32, each off by default until a GPU run measures it (docs/performance.md,
//! "GPU levers"); read by the layers through [`applied`]:
//!
//! - `SDFIX_CUDA_FUSED_NORM` (lever 4): our fused group norm (+ SiLU) and GEGLU kernels
//!   ([`super::cuda::fused`]) in place of candle's composite ops.
//! - `SDFIX_CUDA_VAE_BF16` (lever 6): the VAE decoder in bf16 when the model runs in f16 or bf16,
//!   unless the VAE's config file says `force_upcast: true` (SDXL's), as ComfyUI does for SD VAEs.
//! - `SDFIX_CUDA_CUDNN_CONV` (lever 2, `cudnn` builds): our cuDNN convolution
//!   ([`super::cuda::cudnn_conv`]), plans cached per shape, one workspace, bias fused.
//! - `SDFIX_CUDA_GRAPHS` (lever 5): the UNet forward captured once per shape as a CUDA graph and
//!   replayed ([`super::cuda::graph`]).
//!
//! - `SDFIX_CUDA_FLASH_ATTENTION` (lever 3): our flash-style attention on tensor cores
//!   ([`super::cuda::attention`]) for unmasked f16/bf16 attention with head dims 40/64/80/160.
//!
//! All of this module's `unsafe` is here, each block with its `SAFETY:` line.

use std::sync::OnceLock;

use anyhow::{bail, Result};
use candle_core::Device;

/// The settings [`apply`] applied (read once per process).
static APPLIED: OnceLock<CudaSettings> = OnceLock::new();

/// The switches, as read from the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaSettings {
    pub tf32: bool,
    pub event_tracking: bool,
    pub keep_pool: bool,
    pub htod_cache: bool,
    pub fused_norm: bool,
    pub vae_bf16: bool,
    pub cudnn_conv: bool,
    pub graphs: bool,
    pub flash_attention: bool,
}

impl Default for CudaSettings {
    fn default() -> Self {
        Self {
            tf32: false,
            event_tracking: false,
            keep_pool: true,
            htod_cache: true,
            fused_norm: false,
            vae_bf16: false,
            cudnn_conv: false,
            graphs: false,
            flash_attention: false,
        }
    }
}

/// `0`/`1` (or `false`/`true`) from `name`, or `default` when unset.
fn switch(name: &str, value: Option<&str>, default: bool) -> Result<bool> {
    match value.map(str::trim) {
        None | Some("") => Ok(default),
        Some("1" | "true" | "on") => Ok(true),
        Some("0" | "false" | "off") => Ok(false),
        Some(other) => bail!("{name}={other:?}: expected 0 or 1"),
    }
}

impl CudaSettings {
    /// The settings from `lookup` (the environment in [`Self::from_env`]).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let d = Self::default();
        let get = |name: &str, default: bool| switch(name, lookup(name).as_deref(), default);
        Ok(Self {
            tf32: get("SDFIX_CUDA_TF32", d.tf32)?,
            event_tracking: get("SDFIX_CUDA_EVENT_TRACKING", d.event_tracking)?,
            keep_pool: get("SDFIX_CUDA_KEEP_POOL", d.keep_pool)?,
            htod_cache: get("SDFIX_CUDA_HTOD_CACHE", d.htod_cache)?,
            fused_norm: get("SDFIX_CUDA_FUSED_NORM", d.fused_norm)?,
            vae_bf16: get("SDFIX_CUDA_VAE_BF16", d.vae_bf16)?,
            cudnn_conv: get("SDFIX_CUDA_CUDNN_CONV", d.cudnn_conv)?,
            graphs: get("SDFIX_CUDA_GRAPHS", d.graphs)?,
            flash_attention: get("SDFIX_CUDA_FLASH_ATTENTION", d.flash_attention)?,
        })
    }

    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// One line for `bench`'s report and `-v`: which switches are on.
    pub fn describe(&self) -> String {
        format!(
            "tf32={} event_tracking={} keep_pool={} htod_cache={} fused_norm={} vae_bf16={} cudnn_conv={} graphs={} flash_attention={}",
            self.tf32 as u8,
            self.event_tracking as u8,
            self.keep_pool as u8,
            self.htod_cache as u8,
            self.fused_norm as u8,
            self.vae_bf16 as u8,
            self.cudnn_conv as u8,
            self.graphs as u8,
            self.flash_attention as u8
        )
    }
}

/// Applies `settings` to a freshly opened device (before any tensor is made on it); a no-op on
/// other devices and in builds without CUDA.
#[cfg(feature = "cuda")]
pub fn apply(device: &Device, settings: &CudaSettings) -> Result<()> {
    use anyhow::Context;
    use candle_core::cuda::cudarc::driver::sys;

    let Device::Cuda(cuda) = device else {
        return Ok(());
    };
    let _ = APPLIED.set(*settings);
    candle_core::cuda::set_gemm_reduced_precision_f32(settings.tf32);
    if !settings.event_tracking {
        // SAFETY: sdfix makes, uses and frees every tensor of a device on that device's one stream
        // (candle's default), so no cross-stream ordering is needed; called before any tensor exists.
        unsafe { cuda.disable_event_tracking() };
    }
    if settings.keep_pool {
        let context = cuda.cuda_stream().context().clone();
        context.bind_to_thread().context("binding the CUDA context")?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let mut threshold: u64 = u64::MAX;
        // SAFETY: `pool` is a valid out-pointer and the device handle comes from a live context;
        // the attribute takes a pointer to a u64 (cuMemPoolSetAttribute's documented type for
        // CU_MEMPOOL_ATTR_RELEASE_THRESHOLD) that outlives the call.
        unsafe {
            sys::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device())
                .result()
                .context("cuDeviceGetDefaultMemPool")?;
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
            .result()
            .context("cuMemPoolSetAttribute(RELEASE_THRESHOLD)")?;
        }
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
pub fn apply(_device: &Device, settings: &CudaSettings) -> Result<()> {
    let _ = APPLIED.set(*settings);
    Ok(())
}

/// The settings in force (the defaults until [`apply`] runs).
pub fn applied() -> CudaSettings {
    APPLIED.get().copied().unwrap_or_default()
}

/// Whether a lever applies to a tensor on `device`: a CUDA device in a CUDA build with the
/// lever's switch on (always false in builds without CUDA).
pub fn lever_on(device: &Device, lever: impl Fn(&CudaSettings) -> bool) -> bool {
    cfg!(feature = "cuda") && device.is_cuda() && lever(&applied())
}

/// While alive, small host-to-device uploads on `device` come from candle's content-keyed cache
/// (`SDFIX_CUDA_HTOD_CACHE`); `None` off CUDA or when switched off.
#[cfg(feature = "cuda")]
pub fn htod_cache_guard(device: &Device) -> Option<impl Drop> {
    match device {
        Device::Cuda(cuda) if APPLIED.get().is_some_and(|s| s.htod_cache) => Some(cuda.enable_cuda_graph_htod_cache()),
        _ => None,
    }
}

#[cfg(not(feature = "cuda"))]
pub fn htod_cache_guard(_device: &Device) -> Option<NoGuard> {
    None
}

/// What [`htod_cache_guard`] holds in builds without CUDA (never made).
pub struct NoGuard;

impl Drop for NoGuard {
    fn drop(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_default_and_parse() {
        let none = CudaSettings::from_lookup(|_| None).unwrap();
        assert_eq!(none, CudaSettings::default());
        let all =
            CudaSettings::from_lookup(|name| Some(if name.ends_with("TF32") { "1" } else { "0" }.into())).unwrap();
        assert_eq!(
            all,
            CudaSettings {
                tf32: true,
                event_tracking: false,
                keep_pool: false,
                htod_cache: false,
                fused_norm: false,
                vae_bf16: false,
                cudnn_conv: false,
                graphs: false,
                flash_attention: false,
            }
        );
        let err = CudaSettings::from_lookup(|_| Some("maybe".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("SDFIX_CUDA_") && err.contains("expected 0 or 1"), "{err}");
    }

    /// Each lever of issue 32 is read from its own variable, off by default.
    #[test]
    fn every_lever_has_its_own_switch() {
        type Field = fn(&CudaSettings) -> bool;
        let levers: [(&str, Field); 5] = [
            ("SDFIX_CUDA_FUSED_NORM", |s| s.fused_norm),
            ("SDFIX_CUDA_VAE_BF16", |s| s.vae_bf16),
            ("SDFIX_CUDA_CUDNN_CONV", |s| s.cudnn_conv),
            ("SDFIX_CUDA_GRAPHS", |s| s.graphs),
            ("SDFIX_CUDA_FLASH_ATTENTION", |s| s.flash_attention),
        ];
        let none = CudaSettings::default();
        for (name, field) in levers {
            assert!(!field(&none), "{name} must default to off until a GPU run measures it");
            let on = CudaSettings::from_lookup(|n| (n == name).then(|| "1".to_string())).unwrap();
            assert!(field(&on), "{name}");
            let others_on = levers.iter().filter(|(other, _)| *other != name).any(|(_, f)| f(&on));
            assert!(!others_on, "{name} turned on another lever");
            assert!(on.describe().contains("=1"), "{}", on.describe());
        }
        // Never on off CUDA, whatever the switches say.
        assert!(!lever_on(&Device::Cpu, |_| true));
    }
}
