//! sdfix as a library: open a model, make three images of one prompt, and use their RGB buffers
//! and settings, without clap or files.
//!
//! cargo run --release --example three_images -- [MODEL] [PROMPT]
//!
//! MODEL defaults to the built-in `demo`; any diffusers folder or hub repo id works.

use anyhow::Result;
use sdfix::device::{self, DeviceChoice};
use sdfix::engine::{Engine, Request};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let model = args.next().unwrap_or_else(|| "demo".to_string());
    let prompt = args.next().unwrap_or_else(|| "solid black background".to_string());

    let (device, dtype) = device::resolve(DeviceChoice::Auto, None)?;
    let mut engine = Engine::open(&model, None, &device, dtype)?;
    let jobs = (0..3)
        .map(|seed| {
            engine.job(Request {
                seed,
                steps: 25,
                ..Request::new(&prompt)
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    for image in engine.generate(&jobs)? {
        let mean = image.rgb.iter().map(|&v| f64::from(v)).sum::<f64>() / image.rgb.len() as f64;
        println!(
            "seed {}: {}x{} RGB, mean pixel {mean:.1}; {}",
            image.settings.seed,
            image.width,
            image.height,
            serde_json::to_string(&image.settings)?
        );
    }
    Ok(())
}
