//! Image brightness statistics for the paper's claim (Lin et al. 2024, Section 5.3: stock SD's
//! output brightness follows the initial noise, not the prompt).
//!
//! Luminance is Rec. 709 luma on the sRGB values as stored (0.2126 R + 0.7152 G + 0.0722 B, each
//! in 0..1, no linearisation), averaged over the pixels.

use serde::Serialize;

/// Rec. 709 luma weights.
const LUMA: [f64; 3] = [0.2126, 0.7152, 0.0722];

/// Mean luminance in 0..1 of row-major 8-bit RGB pixels.
pub fn mean_luminance(rgb: &[u8]) -> f64 {
    let pixels = rgb.len() / 3;
    if pixels == 0 {
        return 0.0;
    }
    let total: f64 = rgb
        .chunks_exact(3)
        .map(|p| (0..3).map(|c| LUMA[c] * f64::from(p[c])).sum::<f64>())
        .sum();
    total / 255.0 / pixels as f64
}

/// Summary of a sample: population std; percentiles interpolated linearly (numpy's default).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub count: usize,
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
    pub p10: f64,
    pub p50: f64,
    pub p90: f64,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    let position = q * (sorted.len() - 1) as f64;
    let (low, high) = (position.floor() as usize, position.ceil() as usize);
    sorted[low] + (sorted[high] - sorted[low]) * (position - low as f64)
}

pub fn summarize(values: &[f64]) -> Option<Summary> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
    Some(Summary {
        count: values.len(),
        mean,
        std,
        min: sorted[0],
        max: sorted[sorted.len() - 1],
        p10: percentile(&sorted, 0.1),
        p50: percentile(&sorted, 0.5),
        p90: percentile(&sorted, 0.9),
    })
}

/// Pearson correlation; `None` with fewer than 3 points or no spread.
pub fn correlation(x: &[f64], y: &[f64]) -> Option<f64> {
    if x.len() != y.len() || x.len() < 3 {
        return None;
    }
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let cov: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let (vx, vy): (f64, f64) = (
        x.iter().map(|a| (a - mx).powi(2)).sum(),
        y.iter().map(|b| (b - my).powi(2)).sum(),
    );
    (vx > 0.0 && vy > 0.0).then(|| cov / (vx * vy).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luminance_of_black_white_and_green() {
        assert_eq!(mean_luminance(&[0, 0, 0, 0, 0, 0]), 0.0);
        assert!((mean_luminance(&[255, 255, 255]) - 1.0).abs() < 1e-12);
        assert!((mean_luminance(&[0, 255, 0]) - 0.7152).abs() < 1e-12);
    }

    #[test]
    fn summary_matches_numpy() {
        // numpy: percentile([1, 2, 3, 4], [10, 50, 90]) = [1.3, 2.5, 3.7]; std = 1.118034
        let s = summarize(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert!((s.p10 - 1.3).abs() < 1e-12 && (s.p50 - 2.5).abs() < 1e-12 && (s.p90 - 3.7).abs() < 1e-12);
        assert!((s.std - 1.118_033_988_749_895).abs() < 1e-12);
        assert_eq!((s.min, s.max, s.count), (1.0, 4.0, 4));
    }

    #[test]
    fn correlation_signs() {
        assert!((correlation(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]).unwrap() - 1.0).abs() < 1e-12);
        assert!((correlation(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]).unwrap() + 1.0).abs() < 1e-12);
        assert_eq!(correlation(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]), None);
    }
}
