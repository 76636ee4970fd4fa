//! Zero terminal SNR (Lin et al. 2024, Section 3.1, Algorithm 1).
//!
//! Stock schedules end with alpha_bar_T > 0 (SD's scaled_linear: SNR(T) = 0.0047), so at t = T the
//! training input still holds sqrt(alpha_bar_T) of the image and its mean brightness leaks through;
//! at inference, sampling starts from pure noise and the model never learned what to do with it.
//! Algorithm 1 shifts sqrt(alpha_bar) so its last value is 0 and scales it so its first value is
//! unchanged, then recovers the betas. This is diffusers' `rescale_zero_terminal_snr`.

/// Rescales `betas` so that alpha_bar_T = 0 exactly and alpha_bar_0 is unchanged.
///
/// The last beta becomes 1: a model trained on it sees only noise at t = T, which is why such a
/// model must predict v, not epsilon (Section 3.2).
pub fn rescale_zero_terminal_snr(betas: &[f64]) -> Vec<f64> {
    let alphas_cumprod = super::betas::alphas_cumprod(betas);
    let Some((&first, &last)) = alphas_cumprod.first().zip(alphas_cumprod.last()) else {
        return Vec::new();
    };
    let sqrt_first = first.sqrt();
    let sqrt_last = last.sqrt();
    let scale = sqrt_first / (sqrt_first - sqrt_last);
    let rescaled: Vec<f64> = alphas_cumprod
        .iter()
        .map(|a| {
            let s = (a.sqrt() - sqrt_last) * scale;
            s * s
        })
        .collect();
    // alpha_t = alpha_bar_t / alpha_bar_{t-1}; alpha_0 = alpha_bar_0.
    std::iter::once(rescaled[0])
        .chain(rescaled.windows(2).map(|w| w[1] / w[0]))
        .map(|alpha| 1.0 - alpha)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::betas::{alphas_cumprod, betas, BetaSchedule};
    use super::*;

    #[test]
    fn terminal_alpha_bar_is_exactly_zero_and_first_unchanged() {
        let stock = betas(BetaSchedule::ScaledLinear, 0.00085, 0.012, 1000);
        let rescaled = rescale_zero_terminal_snr(&stock);
        let before = alphas_cumprod(&stock);
        let after = alphas_cumprod(&rescaled);
        assert_eq!(after[999], 0.0);
        assert_eq!(rescaled[999], 1.0);
        assert!((after[0] - before[0]).abs() < 1e-15);
    }
}
