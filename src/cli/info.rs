//! `sdfix info IMAGE.png`: how an image was made, from its text chunks.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use crate::output::metadata::{ImageRecord, PARAMETERS_CHUNK, SETTINGS_CHUNK};
use crate::output::png::read_png_text;

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// PNG files made by sdfix (or by any tool writing AUTOMATIC1111 `parameters`).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,

    /// Print the sdfix settings of each image as one JSON object per line.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &InfoArgs) -> Result<()> {
    let mut out = std::io::stdout().lock();
    for path in &args.images {
        let text = read_png_text(path)?;
        let settings = text.get(SETTINGS_CHUNK);
        if args.json {
            let json = settings.with_context(|| format!("{}: no sdfix settings chunk", path.display()))?;
            let parsed: ImageRecord =
                serde_json::from_str(json).with_context(|| format!("{}: unreadable sdfix settings", path.display()))?;
            writeln!(out, "{}", serde_json::to_string(&parsed)?)?;
            continue;
        }
        writeln!(out, "{}", path.display())?;
        match text.get(PARAMETERS_CHUNK) {
            Some(parameters) => writeln!(out, "parameters:\n{parameters}")?,
            None => writeln!(out, "parameters: (none)")?,
        }
        match settings {
            Some(json) => {
                let value: serde_json::Value = serde_json::from_str(json)
                    .with_context(|| format!("{}: unreadable sdfix settings", path.display()))?;
                writeln!(out, "sdfix:\n{}", serde_json::to_string_pretty(&value)?)?;
            }
            None => writeln!(out, "sdfix: (none)")?,
        }
    }
    Ok(())
}
