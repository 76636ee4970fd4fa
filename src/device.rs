//! Choosing the device and the dtype models run in.

use std::fmt;
use std::str::FromStr;

use anyhow::{Context, Result};
use candle_core::{DType, Device};

/// What `--device` asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA if built with it and a GPU is present, else Metal likewise, else CPU.
    Auto,
    Cpu,
    Cuda(usize),
    Metal,
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            "metal" => Ok(Self::Metal),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(ordinal)) => Ok(Self::Cuda(ordinal)),
                _ => Err(format!(
                    "unknown device {other:?}; expected auto, cpu, cuda, cuda:N or metal"
                )),
            },
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
            Self::Metal => f.write_str("metal"),
        }
    }
}

/// Opens the device; a GPU asked for by name that cannot be used is a clear error.
///
/// `auto` tries CUDA, then Metal, and falls back to the CPU when neither opens:
/// `cuda_is_available()` only says the binary was built with CUDA, not that a driver and a GPU
/// are there (a CUDA build on a CPU-only machine must still run).
pub fn open(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto => {
            if candle_core::utils::cuda_is_available() {
                if let Ok(device) = Device::new_cuda(0) {
                    return Ok(device);
                }
            }
            if candle_core::utils::metal_is_available() {
                if let Ok(device) = Device::new_metal(0) {
                    return Ok(device);
                }
            }
            Ok(Device::Cpu)
        }
        DeviceChoice::Cuda(ordinal) => Device::new_cuda(ordinal).with_context(|| {
            format!(
                "--device cuda:{ordinal}: no usable CUDA device (build with `--features cuda` and check the driver)"
            )
        }),
        DeviceChoice::Metal => Device::new_metal(0)
            .context("--device metal: no usable Metal device (build with `--features metal` on macOS)"),
    }
}

/// Describes a device for messages and metadata.
pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}

/// `--dtype` values.
pub fn parse_dtype(s: &str) -> Result<DType, String> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => Err(format!("unknown dtype {other:?}; expected f32, f16 or bf16")),
    }
}

/// f16 on a GPU (half the memory, tensor cores), f32 on the CPU (where f16 is slow and emulated).
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::F16
    }
}

/// The one check on a device/dtype pair, for every command and the engine.
pub fn check_dtype(device: &Device, dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::F16 => Ok(()),
        DType::BF16 if device.is_cpu() => {
            anyhow::bail!("--dtype bf16 is not supported on the CPU (candle's CPU matmul has no bf16); use f32 or f16")
        }
        DType::BF16 => Ok(()),
        other => anyhow::bail!("--dtype {other:?} is not supported; use f32, f16 or bf16"),
    }
}

/// Opens the device `choice` names and settles the dtype: `dtype`, or the device's default;
/// checked with [`check_dtype`].
pub fn resolve(choice: DeviceChoice, dtype: Option<DType>) -> Result<(Device, DType)> {
    let device = open(choice)?;
    // Before any tensor exists on it (event tracking is decided per tensor at creation).
    crate::kernels::cuda_settings::apply(&device, &crate::kernels::cuda_settings::CudaSettings::from_env()?)?;
    let dtype = dtype.unwrap_or_else(|| default_dtype(&device));
    check_dtype(&device, dtype)?;
    Ok((device, dtype))
}

/// The `--dtype` name of a dtype, as recorded in images.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "f32",
    }
}

/// The peak of the device memory in use while it runs, sampled every millisecond by a thread
/// (CUDA: `cuMemGetInfo`, total - free, less what was in use when the watch started; so the
/// CUDA context itself is not counted, but cuBLAS/cuDNN workspaces and memory-pool caches are).
/// `None` on the CPU and Metal, where peak RSS is the measure.
pub struct MemoryWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sampler: std::thread::JoinHandle<Option<f64>>,
}

impl MemoryWatch {
    pub fn start(device: &Device) -> Option<Self> {
        let used_bytes = used_memory_sampler(device)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let sampler = std::thread::spawn(move || {
            let baseline = used_bytes()?;
            let mut peak = baseline;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(used_bytes()?);
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            peak = peak.max(used_bytes()?);
            Some((peak - baseline) as f64 / (1024.0 * 1024.0))
        });
        Some(Self { stop, sampler })
    }

    /// Stops sampling; the peak in MB above the starting level.
    pub fn finish(self) -> Option<f64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.sampler.join().ok().flatten()
    }
}

#[cfg(feature = "cuda")]
fn used_memory_sampler(device: &Device) -> Option<impl Fn() -> Option<usize> + Send + 'static> {
    let Device::Cuda(cuda) = device else {
        return None;
    };
    let context = cuda.cuda_stream().context().clone();
    Some(move || {
        let (free, total) = context.mem_get_info().ok()?;
        Some(total - free)
    })
}

#[cfg(not(feature = "cuda"))]
fn used_memory_sampler(_: &Device) -> Option<fn() -> Option<usize>> {
    None
}
