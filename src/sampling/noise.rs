//! Seeded Gaussian noise, drawn on the CPU so that a seed gives the same image on every device.
//!
//! Image k of a run with seed s uses its own generator seeded with s + k: the same (prompt, seed)
//! gives the same image whatever the batch size or how many images the run makes. ChaCha20 is a
//! fixed, documented algorithm (rand's `StdRng` may change between versions).
//!
//! The stochastic samplers (Euler a, DPM++ 2M SDE) draw their per-step noise from a second stream
//! of each image's generator: ChaCha20 with the same key (the seed) and stream number
//! [`STEP_NOISE_STREAM`]. It depends only on the image's seed, not on its batch, the device or
//! whether the initial latents came from a file, so `--from-image` and shards reproduce it.
//! img2img's sample of the VAE's latent Gaussian comes from a third stream,
//! [`ENCODE_NOISE_STREAM`], so that the initial noise is the same with or without an init picture
//! (at strength 1 under zero SNR, img2img is then exactly text to image).
//! (DDIM's eta noise keeps continuing the initial stream, as it always has.)

use candle_core::{Device, Result, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};

/// The ChaCha20 stream (of the image's seed) that per-step sampler noise comes from; stream 0 is
/// the initial noise.
pub const STEP_NOISE_STREAM: u64 = 1;

/// The ChaCha20 stream that img2img's VAE posterior samples come from.
pub const ENCODE_NOISE_STREAM: u64 = 2;

/// One generator per image of a batch, and one per image for per-step sampler noise and for the
/// VAE posterior sample.
pub struct ImageNoise {
    generators: Vec<ChaCha20Rng>,
    step_generators: Vec<ChaCha20Rng>,
    encode_generators: Vec<ChaCha20Rng>,
}

/// (images, c, h, w) standard normal f32 values, each image from its own generator.
fn draw(generators: &mut [ChaCha20Rng], (c, h, w): (usize, usize, usize), device: &Device) -> Result<Tensor> {
    let per_image = c * h * w;
    let mut values = Vec::with_capacity(generators.len() * per_image);
    for generator in generators.iter_mut() {
        values.extend((0..per_image).map(|_| -> f32 { StandardNormal.sample(generator) }));
    }
    Tensor::from_vec(values, (generators.len(), c, h, w), &Device::Cpu)?.to_device(device)
}

impl ImageNoise {
    pub fn new(seeds: &[u64]) -> Self {
        let on_stream = |stream: u64| {
            move |&s: &u64| {
                let mut g = ChaCha20Rng::seed_from_u64(s);
                g.set_stream(stream);
                g
            }
        };
        Self {
            generators: seeds.iter().map(|&s| ChaCha20Rng::seed_from_u64(s)).collect(),
            step_generators: seeds.iter().map(on_stream(STEP_NOISE_STREAM)).collect(),
            encode_generators: seeds.iter().map(on_stream(ENCODE_NOISE_STREAM)).collect(),
        }
    }

    /// Draws (images, c, h, w) standard normal f32 values, each image from its own generator.
    pub fn sample(&mut self, shape: (usize, usize, usize), device: &Device) -> Result<Tensor> {
        draw(&mut self.generators, shape, device)
    }

    /// Draws one step's sampler noise, (images, c, h, w), from each image's step stream.
    pub fn sample_step(&mut self, shape: (usize, usize, usize), device: &Device) -> Result<Tensor> {
        draw(&mut self.step_generators, shape, device)
    }

    /// Draws the standard normal values of a VAE posterior sample, (images, c, h, w), from each
    /// image's encode stream.
    pub fn sample_encode(&mut self, shape: (usize, usize, usize), device: &Device) -> Result<Tensor> {
        draw(&mut self.encode_generators, shape, device)
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

    /// The step stream is per image too, and not the initial noise again.
    #[test]
    fn step_noise_is_per_image_and_its_own_stream() {
        let shape = (4, 2, 2);
        let alone = ImageNoise::new(&[43]).sample_step(shape, &Device::Cpu).unwrap();
        let mut batched = ImageNoise::new(&[42, 43]);
        let initial = batched.sample(shape, &Device::Cpu).unwrap();
        let step = batched.sample_step(shape, &Device::Cpu).unwrap();
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(values(&alone), values(&step.get(1).unwrap()));
        assert_ne!(values(&initial.get(1).unwrap()), values(&step.get(1).unwrap()));
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
