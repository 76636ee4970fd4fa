//! The run manifest, `manifest.jsonl` in the output folder: one JSON line per image written, with
//! its file name, prompt-file line, seed, settings, time and initial-noise mean (what
//! `sdfix stats` correlates with brightness).

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::json;

use crate::engine::GeneratedImage;

/// The manifest's file name in the output folder.
pub const MANIFEST: &str = "manifest.jsonl";

/// The manifest line of `image`, written as `file` for prompt-file line `line`.
pub fn record(file: &str, line: usize, image: &GeneratedImage) -> Result<serde_json::Value> {
    Ok(json!({
        "file": file, "line": line, "prompt": image.settings.prompt, "seed": image.settings.seed,
        "settings": serde_json::to_value(&image.settings)?, "seconds": (image.seconds * 1000.0).round() / 1000.0,
        "initial_noise_mean": image.initial_noise_mean,
    }))
}

/// Appends one line to `out_dir`'s manifest with a single write (O_APPEND), so lines from
/// concurrent workers sharing a folder do not interleave.
pub fn append(out_dir: &Path, record: &serde_json::Value) -> Result<()> {
    let path = out_dir.join(MANIFEST);
    let mut line = record.to_string();
    line.push('\n');
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    file.write_all(line.as_bytes())
        .with_context(|| format!("cannot append to {}", path.display()))
}

/// Replaces `out_dir`'s manifest with `records`, atomically (`ablate`: one line per cell however
/// often it runs).
pub fn replace(out_dir: &Path, records: &[serde_json::Value]) -> Result<()> {
    let text: String = records.iter().map(|r| format!("{r}\n")).collect();
    super::png::write_atomic(&out_dir.join(MANIFEST), |tmp| Ok(std::fs::write(tmp, text)?))
}
