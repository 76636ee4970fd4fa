//! The training objective of Lin et al. 2024 (Sections 3.1 and 3.2): the noise schedule rescaled
//! to zero terminal SNR (Algorithm 1) from the model's own betas, and the v-prediction loss
//! (Salimans & Ho 2022), MSE between the UNet's output and
//! `v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0`, with `t` drawn uniformly from all `T`
//! training timesteps, `T - 1` (pure noise, where only v-prediction is well defined) included.
//!
//! Matches diffusers' `train_text_to_image.py` with `DDPMScheduler(rescale_betas_zero_snr=True,
//! prediction_type="v_prediction")`: `add_noise` for x_t, `get_velocity` for the target, and
//! `F.mse_loss(pred.float(), target.float(), reduction="mean")`.

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};

use crate::config::scheduler::SchedulerConfig;
use crate::schedule::NoiseSchedule;

/// alpha_bar for every training timestep, rescaled to zero terminal SNR.
#[derive(Debug, Clone)]
pub struct TrainingSchedule {
    pub noise: NoiseSchedule,
}

impl TrainingSchedule {
    /// The model's betas (its scheduler config), rescaled by Algorithm 1 whatever the config's
    /// `rescale_betas_zero_snr` says: fine-tuning onto that schedule is the point.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        Ok(Self {
            noise: NoiseSchedule::new(&config.beta_source()?, true)?,
        })
    }

    pub fn train_timesteps(&self) -> usize {
        self.noise.train_timesteps()
    }

    /// (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) per timestep, as (b, 1, 1, 1) f32 tensors.
    fn coefficients(&self, timesteps: &[usize], like: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut signal = Vec::with_capacity(timesteps.len());
        let mut noise = Vec::with_capacity(timesteps.len());
        for &t in timesteps {
            ensure!(t < self.train_timesteps(), "timestep {t} out of range");
            // f32 first, as diffusers keeps alphas_cumprod in f32 and takes the roots there.
            let alpha_bar = self.noise.alphas_cumprod[t] as f32;
            signal.push(alpha_bar.sqrt());
            noise.push((1.0 - alpha_bar).sqrt());
        }
        let shape = (timesteps.len(), 1, 1, 1);
        let signal = Tensor::from_vec(signal, shape, like.device())?.to_dtype(like.dtype())?;
        let noise = Tensor::from_vec(noise, shape, like.device())?.to_dtype(like.dtype())?;
        Ok((signal, noise))
    }

    /// The noised latents x_t = sqrt(a) x0 + sqrt(1 - a) eps and the v target, for `x0` and
    /// `noise` (b, c, h, w) at one timestep per sample.
    pub fn noisy_and_target(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<(Tensor, Tensor)> {
        let (signal, noise_scale) = self.coefficients(timesteps, x0)?;
        // (b, c, h, w)
        let noisy = (x0.broadcast_mul(&signal)? + noise.broadcast_mul(&noise_scale)?)?;
        let target = (noise.broadcast_mul(&signal)? - x0.broadcast_mul(&noise_scale)?)?;
        Ok((noisy, target))
    }
}

/// Mean squared error over every element, in f32.
pub fn mse(prediction: &Tensor, target: &Tensor) -> Result<Tensor> {
    let diff = (prediction.to_dtype(DType::F32)? - target.to_dtype(DType::F32)?)?;
    Ok(diff.sqr()?.mean_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// At t = T - 1 (alpha_bar 0) the input is pure noise and the target is -x0.
    #[test]
    fn terminal_timestep_is_pure_noise_with_target_minus_x0() {
        let schedule = TrainingSchedule::from_config(&SchedulerConfig {
            beta_schedule: "scaled_linear".into(),
            beta_start: 0.00085,
            beta_end: 0.012,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(schedule.noise.alphas_cumprod[999], 0.0);
        let dev = Device::Cpu;
        let x0 = Tensor::randn(0f32, 1., (1, 4, 2, 2), &dev).unwrap();
        let eps = Tensor::randn(0f32, 1., (1, 4, 2, 2), &dev).unwrap();
        let (noisy, target) = schedule.noisy_and_target(&x0, &eps, &[999]).unwrap();
        let diff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!(diff(&noisy, &eps), 0.0);
        assert_eq!(diff(&target, &x0.neg().unwrap()), 0.0);
    }
}
