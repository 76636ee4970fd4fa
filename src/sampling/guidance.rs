//! Classifier-free guidance (Ho & Salimans 2022) and its rescale (Lin et al. 2024, Section 3.4,
//! eq. 15-16; diffusers' `rescale_noise_cfg`). The sampler never knows guidance exists.

use candle_core::{Result, Tensor, D};

/// `cfg = uncond + scale * (cond - uncond)`.
pub fn cfg(uncond: &Tensor, cond: &Tensor, scale: f64) -> Result<Tensor> {
    uncond + ((cond - uncond)? * scale)?
}

/// Per-sample standard deviation over every dim but the first, shaped (b, 1, 1, ...) for
/// broadcasting. Biased or not does not matter: only ratios of two of them are used.
fn std_per_sample(xs: &Tensor) -> Result<Tensor> {
    let batch = xs.dim(0)?;
    let flat = xs.reshape((batch, ()))?;
    let centered = flat.broadcast_sub(&flat.mean_keepdim(D::Minus1)?)?;
    let std = centered.sqr()?.mean_keepdim(D::Minus1)?.sqrt()?;
    let mut shape = vec![batch];
    shape.resize(xs.rank(), 1);
    std.reshape(shape)
}

/// Mixes `cfg` with its rescaled copy `cfg * std(cond) / std(cfg)` by `phi` (0 = plain CFG,
/// 1 = fully rescaled; the paper uses 0.7), per sample. Where std(cfg) is 0 (a constant output)
/// the ratio is taken as 1, so the output is `cfg` rather than NaN.
pub fn rescale(cfg: &Tensor, cond: &Tensor, phi: f64) -> Result<Tensor> {
    if phi == 0.0 {
        return Ok(cfg.clone());
    }
    let std_cond = std_per_sample(cond)?;
    let std_cfg = std_per_sample(cfg)?;
    let zero = std_cfg.eq(0.0)?;
    let safe_cfg = zero.where_cond(&std_cond, &std_cfg)?;
    let ratio = zero.where_cond(&std_cond.ones_like()?, &(&std_cond / &safe_cfg)?)?;
    let rescaled = cfg.broadcast_mul(&ratio)?;
    (rescaled * phi)? + (cfg * (1.0 - phi))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rescale_one_matches_the_cond_std_per_sample() {
        let dev = Device::Cpu;
        let cond = Tensor::randn(0f32, 1.0, (2, 4, 3, 3), &dev).unwrap();
        let uncond = Tensor::randn(0f32, 1.0, (2, 4, 3, 3), &dev).unwrap();
        let guided = cfg(&uncond, &cond, 7.5).unwrap();
        let out = rescale(&guided, &cond, 1.0).unwrap();
        let a = std_per_sample(&out)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = std_per_sample(&cond)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }

    #[test]
    fn constant_cfg_is_left_alone() {
        let dev = Device::Cpu;
        let constant = Tensor::ones((1, 4, 2, 2), candle_core::DType::F32, &dev).unwrap();
        let cond = Tensor::randn(0f32, 1.0, (1, 4, 2, 2), &dev).unwrap();
        let out = rescale(&constant, &cond, 0.7).unwrap();
        assert_eq!(out.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![1.0; 16]);
    }
}
