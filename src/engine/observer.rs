//! What a run hands out: each finished image ([`GeneratedImage`]) and events ([`Event`]) to an
//! [`Observer`], which can also stop the run ([`Interrupted`]).

use anyhow::Result;
use candle_core::Tensor;

use super::record::ImageRecord;
use crate::pipeline::StepInfo;

/// One finished image, with everything known about how it was made.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    /// Which job (index into the slice given to [`Engine::run`](super::Engine::run)) and which of its images.
    pub job: usize,
    pub index: usize,
    pub width: usize,
    pub height: usize,
    /// Row-major 8-bit RGB, `width * height * 3` bytes.
    pub rgb: Vec<u8>,
    /// The settings to record in the image (and to make it again).
    pub settings: ImageRecord,
    /// The final latents, (c, h, w) f32 on the CPU, before the VAE and not divided by its
    /// scaling factor.
    pub latents: Tensor,
    /// The mean of the image's initial latents (what stock SD's brightness follows).
    pub initial_noise_mean: f64,
    /// Wall time per image of its batch (load excluded), in seconds.
    pub seconds: f64,
}

/// What a run reports besides its images.
#[derive(Debug, Clone)]
pub enum Event {
    /// The text encoder encoded `texts` distinct texts ahead of the UNet and was freed (unless
    /// [`Engine::keep_text_encoder`](super::Engine::keep_text_encoder) keeps it).
    EncodedAhead { texts: usize, seconds: f64 },
    /// The UNet and VAE are loaded (`seconds` includes the text encoder's load).
    Loaded {
        location: String,
        seconds: f64,
        dtype: candle_core::DType,
        device: String,
    },
    /// A batch of `images` starts its `steps` denoising steps.
    BatchStarted { images: usize, steps: usize },
    /// A batch is done: seconds in text embedding lookup, the UNet loop and the VAE.
    BatchDone {
        images: usize,
        text_seconds: f64,
        unet_seconds: f64,
        vae_seconds: f64,
    },
}

/// Watches a run: every method but [`Observer::image`] has a default that ignores it.
pub trait Observer {
    /// A finished image; an error stops the run.
    fn image(&mut self, image: GeneratedImage) -> Result<()>;
    /// After each denoising step, with the latents and the x0 estimate.
    fn step(&mut self, _step: &StepInfo) {}
    fn event(&mut self, _event: &Event) {}
    /// Something the user should see (a prompt past the token limit).
    fn warn(&mut self, _message: &str) {}
    /// Asked after every denoising step and before every batch: `true` stops the run there,
    /// and [`Engine::run`](super::Engine::run) fails with [`Interrupted`] (the images already handed over stay
    /// made). A server's `/interrupt` and a client that hung up stop a run this way; a step
    /// hook cannot, since it returns nothing.
    fn interrupted(&mut self) -> bool {
        false
    }
}

/// The error of a run that its [`Observer::interrupted`] stopped; find it with
/// `err.is::<Interrupted>()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// An observer that keeps every image.
#[derive(Default)]
pub(super) struct Collect(pub(super) Vec<GeneratedImage>);

impl Observer for Collect {
    fn image(&mut self, image: GeneratedImage) -> Result<()> {
        self.0.push(image);
        Ok(())
    }
}
