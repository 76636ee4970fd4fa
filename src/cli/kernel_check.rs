//! `sdfix kernel-check` (hidden; issue 32): our CUDA kernels against candle's composite ops on the
//! GPU, and the bf16 VAE decode (lever 6) against the f32 decode, one JSON line per check, exit
//! status 1 when any failed. `scripts/gpu_check.sh` runs it first and records its lines; a check
//! whose kernel errors is reported as failed and the rest still run.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;

use crate::device::{self, DeviceChoice};
use crate::kernels::cuda::parity::{self, Check, Measured};

#[derive(Debug, Args)]
pub struct KernelCheckArgs {
    /// The CUDA device (cuda or cuda:N).
    #[arg(long, default_value = "cuda")]
    pub device: DeviceChoice,

    /// A diffusers-layout model folder whose VAE decodes random latents in f32 and in bf16.
    #[arg(long, default_value = "tests/fixtures/tiny-sd")]
    pub vae_model: PathBuf,

    /// Latent size (height and width) of the VAE check.
    #[arg(long, default_value_t = 64)]
    pub latent_size: usize,

    /// Only the small cases (at most a million values each) and no VAE check: for a run under
    /// `compute-sanitizer`, which checks every memory access and is slow.
    #[arg(long)]
    pub small: bool,
}

/// Largest 8-bit pixel difference lever 6 may make (issue 32: within 2/255 of the f32 decode).
const VAE_BF16_PIXEL_TOLERANCE: f64 = 2.0;

/// The VAE's images as 8-bit values (as src/output writes them: (x + 1) / 2, clamped, rounded).
fn to_pixels(images: &Tensor) -> candle_core::Result<Tensor> {
    ((images.to_dtype(DType::F32)? + 1.0)? * 127.5)?
        .clamp(0f32, 255f32)?
        .round()
}

/// Lever 6: the same latents decoded in f32 and in bf16 by `folder`'s VAE.
fn vae_bf16_check(device: &Device, folder: &std::path::Path, size: usize) -> Check {
    let name = format!("vae decode bf16 vs f32, {} latents {size}x{size}", folder.display());
    parity::guarded("vae_bf16", name, VAE_BF16_PIXEL_TOLERANCE, || {
        let config = folder.join("vae/config.json");
        let weights = folder.join("vae/diffusion_pytorch_model.safetensors");
        let load = |dtype| {
            crate::weights::loader::load_vae(&config, &weights, dtype, device).map_err(candle_core::Error::wrap)
        };
        let (f32_vae, bf16_vae) = (load(DType::F32)?, load(DType::BF16)?);
        // Sampler-scale latents (the VAE divides by its scaling factor first).
        let latents = Tensor::randn(0f32, 1.0, (1, 4, size, size), &Device::Cpu)?.to_device(device)?;
        let reference = to_pixels(&f32_vae.decode(&latents)?)?;
        let ours = to_pixels(&bf16_vae.decode(&latents.to_dtype(DType::BF16)?)?)?;
        let diff = (ours - &reference)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
        let time = |vae: &crate::model::vae::Vae, dtype: DType| -> candle_core::Result<f64> {
            let latents = latents.to_dtype(dtype)?;
            vae.decode(&latents)?;
            device.synchronize()?;
            let started = std::time::Instant::now();
            vae.decode(&latents)?;
            device.synchronize()?;
            Ok(started.elapsed().as_secs_f64() * 1e3)
        };
        Ok(Measured {
            diff,
            ours_ms: time(&bf16_vae, DType::BF16)?,
            composite_ms: time(&f32_vae, DType::F32)?,
        })
    })
}

pub fn run(args: &KernelCheckArgs) -> Result<()> {
    if !matches!(args.device, DeviceChoice::Cuda(_)) {
        bail!("kernel-check compares our CUDA kernels with candle's; pass --device cuda (or cuda:N)");
    }
    let (device, _) = device::resolve(args.device, Some(DType::F32))?;
    let mut checks = parity::fused_norm_checks(&device, args.small);
    checks.extend(parity::flash_attention_checks(&device, args.small));
    checks.extend(parity::cudnn_conv_checks(&device, args.small));
    if !args.small {
        checks.push(vae_bf16_check(&device, &args.vae_model, args.latent_size));
    }
    let mut failed = 0;
    for check in &checks {
        failed += usize::from(!check.ok);
        println!("{}", serde_json::to_string(check).context("writing a check as JSON")?);
    }
    if failed > 0 {
        bail!("{failed} of {} kernel checks failed", checks.len());
    }
    Ok(())
}
