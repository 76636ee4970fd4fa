//! Each of our CUDA kernels against candle's composite op on the same inputs, with both one's
//! times: what `sdfix kernel-check` prints and `scripts/gpu_check.sh` records before it measures
//! the switches. A check that errors (a kernel that fails to load or launch) is reported as failed
//! and the others still run.

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};

use super::{attention, fused};
use crate::kernels::activation::composite_geglu;

/// One comparison: which lever, what was run, the worst difference and the tolerance, the times.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub lever: &'static str,
    pub name: String,
    /// max |ours - reference| / max |reference|, the reference computed in f32.
    pub max_rel_diff: Option<f64>,
    pub tolerance: f64,
    /// Median ms per call of ours and of candle's composite op in the same dtype.
    pub ours_ms: Option<f64>,
    pub composite_ms: Option<f64>,
    pub ok: bool,
    pub error: Option<String>,
}

/// Relative tolerance per dtype: f32 at the parity level, f16/bf16 a few roundings of the output.
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 4e-3,
        _ => 2e-2,
    }
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "other",
    }
}

/// max |a - b| / max |b|, in f32.
fn max_rel_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F32)?;
    let b = b.to_dtype(DType::F32)?;
    let diff = (a - &b)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    let scale = b.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    Ok(diff / scale.max(1e-12))
}

/// Median ms per call of `f` on `device`, after one warm-up call.
fn time_ms(device: &Device, f: impl Fn() -> Result<Tensor>) -> Result<f64> {
    const RUNS: usize = 10;
    f()?;
    device.synchronize()?;
    let mut times = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let started = Instant::now();
        let out = f()?;
        device.synchronize()?;
        times.push(started.elapsed().as_secs_f64() * 1e3);
        drop(out);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[RUNS / 2])
}

/// The model's composite group norm ([`crate::kernels::norm::composite`]), then SiLU.
fn composite_group_norm(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let ys = crate::kernels::norm::composite(xs, weight, bias, groups, eps)?;
    if silu {
        ys.silu()
    } else {
        Ok(ys)
    }
}

/// Whether a case is small enough for `kernel-check --small` (run under compute-sanitizer, which
/// makes every access tens of times slower): at most a million values (scores for attention).
fn is_small(values: usize) -> bool {
    values <= 1 << 20
}

/// What one comparison measured: the worst difference and both ops' times (ms).
pub struct Measured {
    pub diff: f64,
    pub ours_ms: f64,
    pub composite_ms: f64,
}

/// `ours()` against `reference` (computed in f32), then both `ours` and `composite` timed.
fn compare(
    device: &Device,
    reference: &Tensor,
    ours: impl Fn() -> Result<Tensor>,
    composite: impl Fn() -> Result<Tensor>,
) -> Result<Measured> {
    Ok(Measured {
        diff: max_rel_diff(&ours()?, reference)?,
        ours_ms: time_ms(device, &ours)?,
        composite_ms: time_ms(device, &composite)?,
    })
}

/// The check `body` measures, ok within `tolerance`; an error is a failed check.
pub fn guarded(lever: &'static str, name: String, tolerance: f64, body: impl FnOnce() -> Result<Measured>) -> Check {
    match body() {
        Ok(m) => Check {
            lever,
            name,
            max_rel_diff: Some(m.diff),
            tolerance,
            ours_ms: Some(m.ours_ms),
            composite_ms: Some(m.composite_ms),
            ok: m.diff <= tolerance,
            error: None,
        },
        Err(e) => Check {
            lever,
            name,
            max_rel_diff: None,
            tolerance,
            ours_ms: None,
            composite_ms: None,
            ok: false,
            error: Some(format!("{e:#}")),
        },
    }
}

/// Group norm shapes of SD 2.1 at 512 px (UNet with CFG, batch 2) and of its VAE decoder.
const GROUP_NORM_CASES: &[(&[usize], usize, bool)] = &[
    (&[2, 320, 64, 64], 32, true),
    (&[2, 1280, 8, 8], 32, true),
    (&[2, 640, 32, 32], 32, false),
    (&[1, 512, 64, 64], 32, true),
    (&[1, 128, 512, 512], 32, true),
    (&[3, 6, 5], 3, false),
];

/// GEGLU inputs of SD 2.1's feed-forwards at 512 px: (batch, tokens, 2 * 4 * channels).
const GEGLU_CASES: &[&[usize]] = &[&[2, 4096, 2560], &[2, 1024, 5120], &[2, 64, 10240], &[3, 7, 6]];

/// Lever 4's checks on `device` (CUDA): every case (the small ones with `small`) in f32, f16 and
/// bf16.
pub fn fused_norm_checks(device: &Device, small: bool) -> Vec<Check> {
    let mut checks = Vec::new();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let tol = tolerance(dtype);
        for &(dims, groups, silu) in GROUP_NORM_CASES
            .iter()
            .filter(|c| !small || is_small(c.0.iter().product()))
        {
            let name = format!("group_norm {} {dims:?} groups {groups} silu {silu}", dtype_name(dtype));
            checks.push(guarded("fused_norm", name, tol, || {
                let channels = dims[1];
                // An offset mean stresses the variance.
                let xs = (Tensor::randn(0f32, 3., dims, device)? + 20.0)?.to_dtype(dtype)?;
                let weight = Tensor::randn(1f32, 0.5, channels, device)?.to_dtype(dtype)?;
                let bias = Tensor::randn(0f32, 0.5, channels, device)?.to_dtype(dtype)?;
                let f32 = |t: &Tensor| t.to_dtype(DType::F32);
                let reference = composite_group_norm(&f32(&xs)?, &f32(&weight)?, &f32(&bias)?, groups, 1e-5, silu)?;
                compare(
                    device,
                    &reference,
                    || fused::group_norm(&xs, &weight, &bias, groups, 1e-5, silu),
                    || composite_group_norm(&xs, &weight, &bias, groups, 1e-5, silu),
                )
            }));
        }
        for &dims in GEGLU_CASES.iter().filter(|d| !small || is_small(d.iter().product())) {
            let name = format!("geglu {} {dims:?}", dtype_name(dtype));
            checks.push(guarded("fused_norm", name, tol, || {
                let xs = Tensor::randn(0f32, 2., dims, device)?.to_dtype(dtype)?;
                let reference = composite_geglu(&xs.to_dtype(DType::F32)?)?;
                compare(device, &reference, || fused::geglu(&xs), || composite_geglu(&xs))
            }));
        }
    }
    checks
}

/// Convolutions of SD 2.1 at 512 px, and an odd small one: (batch, c_in, size, c_out, kernel,
/// stride).
const CONV_CASES: &[(usize, usize, usize, usize, usize, usize)] = &[
    (2, 4, 64, 320, 3, 1),
    (2, 320, 64, 320, 3, 1),
    (2, 640, 32, 1280, 1, 1),
    (2, 320, 64, 320, 3, 2),
    (1, 512, 128, 512, 3, 1),
    (1, 256, 512, 128, 3, 1),
    (1, 8, 13, 16, 3, 2),
];

/// Lever 2's checks on `device` (CUDA, `cudnn` builds): ours against candle's conv2d plus the
/// bias, each case in f32, f16 and bf16; one failed check saying so in other builds.
pub fn cudnn_conv_checks(device: &Device, small: bool) -> Vec<Check> {
    use super::cudnn_conv;
    use crate::kernels::conv::ConvSpec;
    if !cudnn_conv::AVAILABLE {
        return vec![guarded("cudnn_conv", "cudnn convolution".into(), 0.0, || {
            candle_core::bail!("this binary was built without the cudnn feature (scripts/build_cuda.sh --cudnn)")
        })];
    }
    let mut checks = Vec::new();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let tol = tolerance(dtype) * 10.0;
        for &(batch, c_in, size, c_out, kernel, stride) in
            CONV_CASES.iter().filter(|c| !small || is_small(c.0 * c.1 * c.2 * c.2))
        {
            let name = format!(
                "conv2d {} ({batch}, {c_in}, {size}, {size}) -> {c_out} k{kernel} s{stride}",
                dtype_name(dtype)
            );
            checks.push(guarded("cudnn_conv", name, tol, || {
                let spec = ConvSpec {
                    in_channels: c_in,
                    out_channels: c_out,
                    kernel,
                    padding: kernel / 2,
                    stride,
                };
                let xs = Tensor::randn(0f32, 1., (batch, c_in, size, size), device)?.to_dtype(dtype)?;
                let bound = 1.0 / ((c_in * kernel * kernel) as f32).sqrt();
                let weight = Tensor::randn(0f32, bound, (c_out, c_in, kernel, kernel), device)?.to_dtype(dtype)?;
                let bias = Tensor::randn(0f32, 0.5, c_out, device)?.to_dtype(dtype)?;
                let candle = |xs: &Tensor, weight: &Tensor, bias: &Tensor| {
                    xs.conv2d(weight, spec.padding, stride, 1, 1)?
                        .broadcast_add(&bias.reshape((1, (), 1, 1))?)
                };
                let f32 = |t: &Tensor| t.to_dtype(DType::F32);
                let reference = candle(&f32(&xs)?, &f32(&weight)?, &f32(&bias)?)?;
                compare(
                    device,
                    &reference,
                    || cudnn_conv::conv2d(&xs, &weight, &bias, spec),
                    || candle(&xs, &weight, &bias),
                )
            }));
        }
    }
    checks
}

/// Attention shapes at 512 px with CFG (batch 2): (queries, keys, heads, head dim). SD 2.x and
/// SDXL have 64-wide heads (self-attention at 4096 and 1024 tokens, cross-attention over 77 text
/// tokens), SD 1.x 8 heads of 40/80/160; the last two are odd sizes (a partial query block and
/// key tile).
const ATTENTION_CASES: &[(usize, usize, usize, usize)] = &[
    (4096, 4096, 5, 64),
    (4096, 77, 5, 64),
    (1024, 1024, 10, 64),
    (4096, 4096, 8, 40),
    (1024, 1024, 8, 80),
    (256, 77, 8, 160),
    (70, 77, 3, 40),
    (1, 200, 2, 160),
];

/// Lever 3's checks on `device` (CUDA): ours against the model's composite attention computed
/// in f32, each case in f16 and bf16; times against the composite in the same dtype.
pub fn flash_attention_checks(device: &Device, small: bool) -> Vec<Check> {
    use crate::kernels::attention::composite as composite_attention;
    let mut checks = Vec::new();
    for dtype in [DType::F16, DType::BF16] {
        let tol = tolerance(dtype);
        for &(queries, keys, heads, head_dim) in ATTENTION_CASES.iter().filter(|c| !small || is_small(c.0 * c.1 * c.2))
        {
            let name = format!(
                "flash_attention {} batch 2 queries {queries} keys {keys} heads {heads} x {head_dim}",
                dtype_name(dtype)
            );
            checks.push(guarded("flash_attention", name, tol, || {
                let inner = heads * head_dim;
                let q = Tensor::randn(0f32, 1., (2, queries, inner), device)?.to_dtype(dtype)?;
                let k = Tensor::randn(0f32, 1., (2, keys, inner), device)?.to_dtype(dtype)?;
                let v = Tensor::randn(0f32, 1., (2, keys, inner), device)?.to_dtype(dtype)?;
                let f32 = |t: &Tensor| t.to_dtype(DType::F32);
                let reference = composite_attention(&f32(&q)?, &f32(&k)?, &f32(&v)?, heads, None)?;
                compare(
                    device,
                    &reference,
                    || attention::flash_attention(&q, &k, &v, heads),
                    || composite_attention(&q, &k, &v, heads, None),
                )
            }));
        }
    }
    checks
}
