//! Seeded Gaussian noise, drawn on the CPU so that a seed gives the same image on every device.
//!
//! Image k of a run with seed s uses its own generator seeded with s + k: the same (prompt, seed)
//! gives the same image whatever the batch size or how many images the run makes. ChaCha20 is a
//! fixed, documented algorithm (rand's `StdRng` may change between versions).

use candle_core::{Device, Result, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};

/// One generator per image of a batch.
pub struct ImageNoise {
    generators: Vec<ChaCha20Rng>,
}

impl ImageNoise {
    pub fn new(seeds: &[u64]) -> Self {
        Self {
            generators: seeds.iter().map(|&s| ChaCha20Rng::seed_from_u64(s)).collect(),
        }
    }

    /// Draws (images, c, h, w) standard normal f32 values, each image from its own generator.
    pub fn sample(&mut self, (c, h, w): (usize, usize, usize), device: &Device) -> Result<Tensor> {
        let per_image = c * h * w;
        let mut values = Vec::with_capacity(self.generators.len() * per_image);
        for generator in &mut self.generators {
            values.extend((0..per_image).map(|_| -> f32 { StandardNormal.sample(generator) }));
        }
        Tensor::from_vec(values, (self.generators.len(), c, h, w), &Device::Cpu)?.to_device(device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_does_not_depend_on_its_batch() {
        let alone = ImageNoise::new(&[43]).sample((4, 2, 2), &Device::Cpu).unwrap();
        let batched = ImageNoise::new(&[42, 43]).sample((4, 2, 2), &Device::Cpu).unwrap();
        let second = batched.get(1).unwrap().unsqueeze(0).unwrap();
        assert_eq!(
            alone.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            second.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn noise_is_roughly_standard_normal() {
        let x = ImageNoise::new(&[0])
            .sample((4, 64, 64), &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap();
        let mean = x.mean_all().unwrap().to_scalar::<f32>().unwrap();
        let var = x.sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.05, "mean {mean} var {var}");
    }
}
