//! What the network predicts, and the conversions between its output and the two quantities
//! every sampler needs: the clean-sample estimate x0 and the noise estimate eps.
//!
//! With x_t = sqrt(a) x0 + sqrt(1 - a) eps at alpha_bar = a (Ho et al. 2020, eq. 4):
//! - epsilon: x0 = (x_t - sqrt(1 - a) eps) / sqrt(a), which divides by zero at a zero-SNR t = T;
//! - v (Salimans & Ho 2022; Lin et al. 2024, eq. 7-8, Section 3.2): v = sqrt(a) eps - sqrt(1 - a) x0,
//!   so x0 = sqrt(a) x_t - sqrt(1 - a) v and eps = sqrt(a) v + sqrt(1 - a) x_t: no division, finite
//!   at a = 0, where x0 = -v;
//! - sample: x0 directly, eps = (x_t - sqrt(a) x0) / sqrt(1 - a).
//!
//! These are diffusers' `DDIMScheduler.step` stage 3 ("compute predicted original sample from
//! predicted noise"), for its three `prediction_type`s.

use std::fmt;
use std::str::FromStr;

use candle_core::{Result, Tensor};

/// What the model predicts (diffusers' `prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Prediction {
    /// The added noise (SD 1.x, SD 2.x base).
    Epsilon,
    /// v = sqrt(a) eps - sqrt(1 - a) x0 (SD 2.x 768, the paper's models).
    VPrediction,
    /// x0 directly.
    Sample,
}

impl Prediction {
    pub fn name(self) -> &'static str {
        match self {
            Self::Epsilon => "epsilon",
            Self::VPrediction => "v_prediction",
            Self::Sample => "sample",
        }
    }
}

impl fmt::Display for Prediction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Prediction {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "epsilon" => Ok(Self::Epsilon),
            "v_prediction" => Ok(Self::VPrediction),
            "sample" => Ok(Self::Sample),
            other => Err(format!(
                "unknown prediction type {other:?}; expected epsilon, v_prediction or sample"
            )),
        }
    }
}

/// (x0, eps) from the model output for `sample` x_t at alpha_bar = `alpha`.
pub fn x0_and_eps(sample: &Tensor, output: &Tensor, prediction: Prediction, alpha: f64) -> Result<(Tensor, Tensor)> {
    let (sqrt_a, sqrt_1ma) = (alpha.sqrt(), (1.0 - alpha).sqrt());
    Ok(match prediction {
        Prediction::Epsilon => (((sample - (output * sqrt_1ma)?)? / sqrt_a)?, output.clone()),
        Prediction::VPrediction => (
            ((sample * sqrt_a)? - (output * sqrt_1ma)?)?,
            ((output * sqrt_a)? + (sample * sqrt_1ma)?)?,
        ),
        Prediction::Sample => (output.clone(), ((sample - (output * sqrt_a)?)? / sqrt_1ma)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// Each prediction type, made from a known (x0, eps), converts back to them.
    #[test]
    fn every_prediction_type_recovers_x0_and_eps() {
        let dev = Device::Cpu;
        let x0 = Tensor::new(&[0.25f32, -0.5], &dev).unwrap();
        let eps = Tensor::new(&[1.3f32, 0.2], &dev).unwrap();
        let alpha = 0.3f64;
        let (sa, s1) = (alpha.sqrt(), (1.0 - alpha).sqrt());
        let x_t = ((&x0 * sa).unwrap() + (&eps * s1).unwrap()).unwrap();
        let v = ((&eps * sa).unwrap() - (&x0 * s1).unwrap()).unwrap();
        for (prediction, output) in [
            (Prediction::Epsilon, &eps),
            (Prediction::VPrediction, &v),
            (Prediction::Sample, &x0),
        ] {
            let (got_x0, got_eps) = x0_and_eps(&x_t, output, prediction, alpha).unwrap();
            for (a, b) in values(&got_x0).iter().zip(values(&x0)) {
                assert!((a - b).abs() < 1e-6, "{prediction}: x0 {a} vs {b}");
            }
            for (a, b) in values(&got_eps).iter().zip(values(&eps)) {
                assert!((a - b).abs() < 1e-6, "{prediction}: eps {a} vs {b}");
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for p in [Prediction::Epsilon, Prediction::VPrediction, Prediction::Sample] {
            assert_eq!(p.name().parse::<Prediction>().unwrap(), p);
        }
        assert!("eps".parse::<Prediction>().is_err());
    }
}
