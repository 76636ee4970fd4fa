//! `sdfix stats IMAGES...|DIR`: mean luminance per image and a summary; with a folder that has a
//! `manifest.jsonl`, also the correlation between each image's initial-noise mean and its
//! luminance (the paper's mechanism: stock SD's brightness follows the noise, not the prompt).

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

use super::luminance::{correlation, mean_luminance, summarize};

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// PNG files, or folders of them (not recursive).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,

    /// Print one JSON object: per-image luminance, summary, noise correlation.
    #[arg(long)]
    pub json: bool,

    /// Also draw a histogram of the luminances (20 bins over 0..1) to this PNG.
    #[arg(long, value_name = "FILE.png")]
    pub histogram: Option<PathBuf>,

    /// Title of the histogram.
    #[arg(long, default_value = "mean luminance")]
    pub title: String,
}

/// Initial-noise means by file name, from each folder's manifest.jsonl.
fn noise_means(folder: &Path, into: &mut HashMap<PathBuf, f64>) -> Result<()> {
    let manifest = folder.join("manifest.jsonl");
    let Ok(text) = std::fs::read_to_string(&manifest) else {
        return Ok(());
    };
    for (n, line) in text.lines().enumerate() {
        let value: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}:{}: not JSON", manifest.display(), n + 1))?;
        if let (Some(file), Some(mean)) = (value["file"].as_str(), value["initial_noise_mean"].as_f64()) {
            into.insert(folder.join(file), mean);
        }
    }
    Ok(())
}

pub fn run(args: &StatsArgs) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let mut images = Vec::new();
    let mut noise = HashMap::new();
    for path in &args.paths {
        if path.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("cannot read {}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")))
                .collect();
            found.sort();
            images.extend(found);
            noise_means(path, &mut noise)?;
        } else {
            images.push(path.clone());
        }
    }
    if images.is_empty() {
        bail!(
            "no PNG images in {}",
            args.paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut rows = Vec::with_capacity(images.len());
    for path in &images {
        let image = image::open(path).with_context(|| format!("{} is not a readable image", path.display()))?;
        rows.push((path, mean_luminance(image.to_rgb8().as_raw())));
    }
    let values: Vec<f64> = rows.iter().map(|(_, l)| *l).collect();
    let summary = summarize(&values);
    if let Some(path) = &args.histogram {
        let canvas = crate::output::grid::histogram(&values, &args.title);
        crate::output::png::write_png(path, &canvas.rgb, canvas.width as u32, canvas.height as u32, &[])?;
    }
    let paired: Vec<(f64, f64)> = rows
        .iter()
        .filter_map(|(p, l)| noise.get(*p).map(|n| (*n, *l)))
        .collect();
    let (xs, ys): (Vec<f64>, Vec<f64>) = paired.iter().copied().unzip();
    let noise_correlation = correlation(&xs, &ys);
    if args.json {
        let report = json!({
            "images": rows.iter().map(|(p, l)| json!({"file": p.display().to_string(), "luminance": l})).collect::<Vec<_>>(),
            "summary": summary,
            "noise_correlation": noise_correlation,
            "noise_pairs": paired.len(),
        });
        writeln!(out, "{report}")?;
        return Ok(());
    }
    for (path, luminance) in &rows {
        writeln!(out, "{luminance:.4}  {}", path.display())?;
    }
    if let Some(s) = summary {
        writeln!(
            out,
            "n {}  mean {:.4}  std {:.4}  min {:.4}  max {:.4}  p10 {:.4}  p50 {:.4}  p90 {:.4}",
            s.count, s.mean, s.std, s.min, s.max, s.p10, s.p50, s.p90
        )?;
    }
    if let Some(r) = noise_correlation {
        writeln!(
            out,
            "correlation of initial-noise mean with luminance: {r:.3} over {} images",
            paired.len()
        )?;
    }
    Ok(())
}
