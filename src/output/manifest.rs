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

/// The lines of `out_dir`'s manifest in order, each parsed or, when it is not a JSON object (a
/// line torn by a crash mid-write), the error; no manifest is no lines.
pub fn read(out_dir: &Path) -> Result<Vec<Result<serde_json::Value, String>>> {
    let path = out_dir.join(MANIFEST);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
    };
    Ok(text
        .lines()
        .map(|line| match serde_json::from_str::<serde_json::Value>(line) {
            Ok(value) if value.is_object() => Ok(value),
            Ok(_) => Err("not a JSON object".to_string()),
            Err(err) => Err(err.to_string()),
        })
        .collect())
}

/// Replaces `out_dir`'s manifest with `records`, atomically (`ablate`: one line per cell however
/// often it runs).
pub fn replace(out_dir: &Path, records: &[serde_json::Value]) -> Result<()> {
    let text: String = records.iter().map(|r| format!("{r}\n")).collect();
    super::png::write_atomic(&out_dir.join(MANIFEST), |tmp| Ok(std::fs::write(tmp, text)?))
}
