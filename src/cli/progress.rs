//! What a run tells the person watching it, on stderr.
//!
//! On a terminal: an outer bar over images (count, ETA) and an inner bar over the steps of the
//! current batch (it/s). Elsewhere (a log file, a cluster job): one plain line per image. `--quiet`
//! prints only warnings and errors; `--verbose` adds per-stage timings.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How much to say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verbosity {
    Quiet,
    Normal,
    Verbose,
}

pub struct Progress {
    verbosity: Verbosity,
    bars: Option<(MultiProgress, ProgressBar, ProgressBar)>,
}

impl Progress {
    pub fn new(total_images: usize, verbosity: Verbosity) -> Self {
        let bars = (verbosity != Verbosity::Quiet && std::io::stderr().is_terminal()).then(|| {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let images = multi.add(ProgressBar::new(total_images as u64));
            images.set_style(
                ProgressStyle::with_template("images {bar:30} {pos}/{len} eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            let steps = multi.add(ProgressBar::new(0));
            steps.set_style(
                ProgressStyle::with_template("steps  {bar:30} {pos}/{len} {per_sec}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            images.enable_steady_tick(Duration::from_millis(250));
            (multi, images, steps)
        });
        Self { verbosity, bars }
    }

    /// A line that must be seen (warnings, line errors), above the bars.
    pub fn warn(&self, message: &str) {
        match &self.bars {
            Some((multi, _, _)) => {
                let _ = multi.println(message);
            }
            None => eprintln!("{message}"),
        }
    }

    /// A normal-verbosity line (loads, image written), above the bars or plain.
    pub fn info(&self, message: &str) {
        if self.verbosity == Verbosity::Quiet {
            return;
        }
        match &self.bars {
            // With bars, written images show as the bar moving; keep the screen calm.
            Some(_) => {}
            None => eprintln!("{message}"),
        }
    }

    /// A verbose-only line (timings).
    pub fn detail(&self, message: &str) {
        if self.verbosity == Verbosity::Verbose {
            self.warn(message);
        }
    }

    pub fn start_batch(&self, steps: usize) {
        if let Some((_, _, bar)) = &self.bars {
            bar.reset();
            bar.set_length(steps as u64);
        }
    }

    pub fn step(&self) {
        if let Some((_, _, bar)) = &self.bars {
            bar.inc(1);
        }
    }

    pub fn image_done(&self, message: &str) {
        if let Some((_, images, _)) = &self.bars {
            images.inc(1);
        }
        self.info(message);
    }

    pub fn finish(&self) {
        if let Some((multi, images, steps)) = &self.bars {
            images.finish_and_clear();
            steps.finish_and_clear();
            let _ = multi.clear();
        }
    }
}

impl Progress {
    /// Shows what the engine reports: loads and timings (verbose), the step bar.
    pub fn report(&self, event: &crate::engine::Event) {
        use crate::engine::Event;
        match event {
            Event::EncodedAhead { texts, seconds } => self.detail(&format!(
                "timing: encoded {texts} text(s) in {seconds:.3} s, text encoder freed"
            )),
            Event::Loaded {
                location,
                seconds,
                dtype,
                device,
            } => {
                self.info(&format!(
                    "loaded {location} in {seconds:.1} s ({} on {device})",
                    crate::device::dtype_name(*dtype)
                ));
                self.detail(&format!("timing: load {seconds:.3} s"));
            }
            Event::BatchStarted { steps, .. } => self.start_batch(*steps),
            Event::BatchDone {
                images,
                text_seconds,
                unet_seconds,
                vae_seconds,
            } => self.detail(&format!(
                "timing: batch of {images}: text {text_seconds:.3} s, unet {unet_seconds:.3} s, vae {vae_seconds:.3} s"
            )),
        }
    }
}
