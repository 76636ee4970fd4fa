//! Element-wise f32 math for our CPU kernels, written so the compiler vectorises it (no branches,
//! no libm calls), and compiled for AVX-512 / AVX2 at run time when the CPU has them: the binary
//! itself targets baseline x86-64 (SSE2), where libm's scalar `expf` and `erff` made the softmax,
//! SiLU and GELU a visible share of a UNet step (docs/performance.md).
//!
//! Accuracy: `exp` within 3e-7 relative (Cephes' expf polynomial after Cody-Waite reduction),
//! `erf` within 3e-7 absolute (Abramowitz & Stegun 7.1.26, a Taylor series near 0), both far below the 1e-4 relative bar our
//! diffusers parity tests hold (and measure near 1e-6).

use std::f32::consts::LOG2_E;
use std::mem::MaybeUninit;

/// e^x for x in [-87.3, 88.3] (clamped there: ~0 and ~2e38 at the ends).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.3);
    // n = round(x / ln 2) via the 1.5 * 2^23 trick (exact for |n| < 2^22): t's low mantissa
    // bits hold n as an integer too.
    let t = x * LOG2_E + 12_582_912.0;
    let n = t - 12_582_912.0;
    // r = x - n ln 2 in two parts, so r keeps full precision.
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // 2^n from its exponent bits (n in [-126, 127] after the clamp), n read from t's bits with
    // integer ops: `n as i32` is a saturating conversion that does not vectorise (it made the
    // softmax half of flash attention's time).
    let n_bits = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    e_r * f32::from_bits((n_bits.wrapping_add(127) << 23) as u32)
}

/// The error function: A&S 7.1.26 (|error| <= 1.5e-7 before rounding) for |x| >= 0.8, its
/// Taylor series below, where 1 - poly e^(-x^2) would lose the small result to cancellation.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let tail = 1.0 - poly * exp(-a * a);
    // 2/sqrt(pi) sum (-1)^n a^(2n+1) / (n! (2n+1)), n <= 7: error < 4e-8 for a < 0.8.
    let s = a * a;
    let mut series = -1.0 / 75_600.0;
    for c in [
        1.0 / 9_360.0,
        -1.0 / 1_320.0,
        1.0 / 216.0,
        -1.0 / 42.0,
        0.1,
        -1.0 / 3.0,
        1.0,
    ] {
        series = series * s + c;
    }
    let series = series * a * std::f32::consts::FRAC_2_SQRT_PI;
    let y = if a < 0.8 { series } else { tail };
    y.copysign(x)
}

/// x * sigmoid(x).
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// The exact (erf) GELU: x/2 (1 + erf(x / sqrt 2)).
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Defines `pub fn $name(args)` that runs `$body` compiled for AVX-512F, else AVX2+FMA, else the
/// baseline, choosing once per call by CPU feature detection.
macro_rules! dispatch {
    ($(#[$meta:meta])* pub fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        pub fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                // Unsafe to call: only on a CPU with the features enabled, checked below.
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) { body($($arg),*) }
                let avx2_fma = std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
                if avx2_fma && std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: calling a #[target_feature] function is sound exactly when the CPU
                    // has those features: avx512f, avx2 and fma were all detected just above. The
                    // body takes its arguments as the safe caller gave them.
                    return unsafe { avx512($($arg),*) };
                }
                if avx2_fma {
                    // SAFETY: avx2 and fma, the features `avx2` is compiled for, were detected
                    // just above; the arguments are the safe caller's.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

/// Lanes of the explicit accumulators below: FP reductions only vectorise when written as
/// independent lanes (the compiler may not reorder a single running sum).
const LANES: usize = 16;

/// The largest element (a NaN-free row), lane-wise.
#[inline(always)]
fn max_of(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            *m = if x > *m { x } else { *m };
        }
    }
    let mut max = tail.iter().fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    for m in lanes {
        max = if m > max { m } else { max };
    }
    max
}

/// Scores this far below their row's maximum get probability 0: e^-70 = 4e-31 is far below what
/// an f32 sum of at least 1 resolves, and exp of anything lower (masked -inf scores: half the text
/// encoder's causal mask), once divided by the sum, is a subnormal float, whose every later
/// multiply (the product with v) takes a microcode assist: the masked attention ran 14x slower.
const SOFTMAX_CUTOFF: f32 = -70.0;

/// One unnormalised softmax term e^x, x = score - row max <= 0.
#[inline(always)]
fn softmax_term(x: f32) -> f32 {
    if x < SOFTMAX_CUTOFF {
        0.0
    } else {
        exp(x)
    }
}

dispatch! {
    /// One key block of an online (flash) softmax, row by row: each `row_len`-long row of
    /// `scores` becomes its terms e^(s - m'), with m' the larger of the row's running maximum and
    /// the block's; the running sum is rescaled by `correction` = e^(m - m') and grows by the
    /// terms; the caller rescales its output rows by `correction` before adding this block's.
    pub fn online_softmax_rows(
        scores: &mut [f32],
        row_len: usize,
        running_max: &mut [f32],
        running_sum: &mut [f32],
        correction: &mut [f32],
    ) {
        for (r, row) in scores.chunks_mut(row_len).enumerate() {
            let new_max = max_of(row).max(running_max[r]);
            // A row masked out so far: its terms are 0 either way, and -inf - -inf is NaN.
            let shift = if new_max == f32::NEG_INFINITY { 0.0 } else { new_max };
            correction[r] = softmax_term(running_max[r] - shift);
            running_max[r] = new_max;
            let mut lanes = [0f32; LANES];
            let split = row.len() / LANES * LANES;
            let (body, tail) = row.split_at_mut(split);
            for chunk in body.chunks_exact_mut(LANES) {
                for (s, x) in lanes.iter_mut().zip(chunk.iter_mut()) {
                    *x = softmax_term(*x - shift);
                    *s += *x;
                }
            }
            let mut sum = 0.0;
            for x in tail.iter_mut() {
                *x = softmax_term(*x - shift);
                sum += *x;
            }
            running_sum[r] = running_sum[r] * correction[r] + sum + lanes.iter().sum::<f32>();
        }
    }
}

dispatch! {
    /// `dst[i] = (src[i] - pivot) * scale + shift`, then SiLU when `silu`.
    pub fn scale_shift(dst: &mut [MaybeUninit<f32>], src: &[f32], pivot: f32, scale: f32, shift: f32, silu: bool) {
        if silu {
            for (d, &x) in dst.iter_mut().zip(src) {
                d.write(self::silu((x - pivot) * scale + shift));
            }
        } else {
            for (d, &x) in dst.iter_mut().zip(src) {
                d.write((x - pivot) * scale + shift);
            }
        }
    }
}

dispatch! {
    /// GEGLU: `dst[i] = value[i] * gelu_erf(gate[i])`.
    pub fn geglu(dst: &mut [MaybeUninit<f32>], value: &[f32], gate: &[f32]) {
        for ((d, &v), &g) in dst.iter_mut().zip(value).zip(gate) {
            d.write(v * gelu_erf(g));
        }
    }
}

dispatch! {
    /// `dst[i] = gelu_erf(src[i])`.
    pub fn gelu_slice(dst: &mut [MaybeUninit<f32>], src: &[f32]) {
        for (d, &x) in dst.iter_mut().zip(src) {
            d.write(gelu_erf(x));
        }
    }
}

dispatch! {
    /// Sum and sum of squares of `xs - pivot`: f32 lanes over runs of 1024, f64 across runs.
    pub fn shifted_sums(xs: &[f32], pivot: f32, out: &mut [f64; 2]) {
        let (mut sum, mut sum_sq) = (0f64, 0f64);
        for run in xs.chunks(1024) {
            let (mut s, mut q) = ([0f32; LANES], [0f32; LANES]);
            let chunks = run.chunks_exact(LANES);
            let tail = chunks.remainder();
            for chunk in chunks {
                for ((s, q), &x) in s.iter_mut().zip(q.iter_mut()).zip(chunk) {
                    let d = x - pivot;
                    *s += d;
                    *q += d * d;
                }
            }
            for &x in tail {
                let d = x - pivot;
                s[0] += d;
                q[0] += d * d;
            }
            sum += s.iter().map(|&v| v as f64).sum::<f64>();
            sum_sq += q.iter().map(|&v| v as f64).sum::<f64>();
        }
        *out = [sum, sum_sq];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let exact = (x as f64).exp();
            worst = worst.max(((exp(x) as f64 - exact) / exact).abs());
            x += 0.001_37;
        }
        assert!(worst < 3e-7, "max relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1e-37 && exp(1000.0).is_finite());
    }

    #[test]
    fn erf_and_gelu_are_accurate() {
        let mut x = -6.0f64;
        while x < 6.0 {
            let exact = libm::erf(x);
            let error = (erf(x as f32) as f64 - exact).abs();
            assert!(error < 4e-7, "erf({x}): {error:e}");
            let gelu = 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2));
            assert!(
                (gelu_erf(x as f32) as f64 - gelu).abs() < 1e-6 * (1.0 + x.abs()),
                "gelu({x})"
            );
            x += 0.0071;
        }
    }

    /// Softmax of each `row_len`-long row: one block of the online softmax from a fresh state,
    /// divided by its sums (what attention does when all keys fit one block).
    fn softmax_rows(rows: &mut [f32], row_len: usize) {
        let n = rows.len() / row_len;
        let (mut max, mut sum, mut correction) = (vec![f32::NEG_INFINITY; n], vec![0f32; n], vec![0f32; n]);
        online_softmax_rows(rows, row_len, &mut max, &mut sum, &mut correction);
        for (row, s) in rows.chunks_mut(row_len).zip(&sum) {
            row.iter_mut().for_each(|x| *x /= s);
        }
    }

    #[test]
    fn long_rows_and_sums_use_every_lane() {
        let mut rows: Vec<f32> = (0..2 * 1000).map(|i| ((i * 37) % 101) as f32 / 10.0).collect();
        let expected: Vec<f64> = rows
            .chunks(1000)
            .flat_map(|row| {
                let max = row.iter().fold(f32::MIN, |m, &x| m.max(x)) as f64;
                let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
                row.iter()
                    .map(move |&x| (x as f64 - max).exp() / sum)
                    .collect::<Vec<_>>()
            })
            .collect();
        softmax_rows(&mut rows, 1000);
        for (got, want) in rows.iter().zip(&expected) {
            assert!((*got as f64 - want).abs() < 1e-7 + 1e-5 * want);
        }
        let xs: Vec<f32> = (0..3001).map(|i| (i % 7) as f32 + 100.0).collect();
        let mut sums = [0f64; 2];
        shifted_sums(&xs, 100.0, &mut sums);
        let exact: f64 = xs.iter().map(|&x| x as f64 - 100.0).sum();
        let exact_sq: f64 = xs.iter().map(|&x| (x as f64 - 100.0).powi(2)).sum();
        assert!((sums[0] - exact).abs() < 1e-6 && (sums[1] - exact_sq).abs() < 1e-6);
    }

    #[test]
    fn softmax_rows_sum_to_one() {
        let mut rows = vec![1.0, 2.0, 3.0, -1e30, 0.0, 0.0];
        softmax_rows(&mut rows, 3);
        assert!((rows[..3].iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((rows[2] - 0.665_240_9).abs() < 1e-6);
        assert!(rows[3] < 1e-37);
        assert!((rows[4] - 0.5).abs() < 1e-6);
    }
}
