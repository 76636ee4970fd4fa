//! `sdfix ablate`: the paper's ablation as one command and one labelled picture.
//!
//! Columns are the paper's progression (Lin et al. 2024, Figure 6 / Table 3): `baseline` (leading
//! timesteps, no zero-SNR rescale, no CFG rescale) -> `+zero-SNR` -> `+trailing` -> `+rescaled CFG`
//! (all fixes); or all 8 on/off combinations of those three sampler-side fixes; or one or two
//! `--sweep` axes of numeric settings. Rows are prompts x seeds. Every cell of a row starts from the
//! same noise (the seed), every cell is also a PNG with full metadata (as `generate` writes it),
//! and `grid.json` describes them all.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use serde_json::json;

use super::args::{
    at_least_one, base_request, DeviceArgs, ModelArgs, PromptArgs, SamplerArgs, SizeArgs, VerbosityArgs,
};
use super::progress::{Progress, Verbosity};
use super::prompts;
use crate::engine::{Engine, Event, GeneratedImage, Observer, Request, Words};
use crate::output::grid::{self, Cell};
use crate::output::{manifest, png};
use crate::pipeline::StepInfo;
use crate::schedule::TimestepSpacing;

/// A setting an axis varies, with its values as typed.
#[derive(Debug, Clone, PartialEq)]
pub struct Sweep {
    pub key: SweepKey,
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SweepKey {
    Guidance,
    GuidanceRescale,
    Steps,
    Spacing,
    Eta,
    Sampler,
}

impl SweepKey {
    fn name(self) -> &'static str {
        match self {
            Self::Guidance => "guidance",
            Self::GuidanceRescale => "guidance-rescale",
            Self::Steps => "steps",
            Self::Spacing => "spacing",
            Self::Eta => "eta",
            Self::Sampler => "sampler",
        }
    }

    /// Applies `value` to `request`; an unparsable value is an error naming the key.
    fn apply(self, request: &mut Request, value: &str) -> Result<()> {
        let bad = || format!("--sweep {}: {value:?} is not a valid value", self.name());
        match self {
            Self::Guidance => request.guidance = value.parse().with_context(bad)?,
            Self::GuidanceRescale => request.guidance_rescale = value.parse().with_context(bad)?,
            Self::Steps => request.steps = value.parse().with_context(bad)?,
            Self::Spacing => request.spacing = value.parse().map_err(anyhow::Error::msg).with_context(bad)?,
            Self::Eta => request.eta = value.parse().with_context(bad)?,
            Self::Sampler => request.sampler = value.parse().map_err(anyhow::Error::msg).with_context(bad)?,
        }
        Ok(())
    }
}

impl FromStr for Sweep {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (key, values) = s.split_once('=').ok_or_else(|| format!("{s:?} is not KEY=V1,V2,..."))?;
        let key = match key {
            "guidance" => SweepKey::Guidance,
            "guidance-rescale" | "guidance_rescale" => SweepKey::GuidanceRescale,
            "steps" => SweepKey::Steps,
            "spacing" => SweepKey::Spacing,
            "eta" => SweepKey::Eta,
            "sampler" => SweepKey::Sampler,
            other => {
                return Err(format!(
                    "unknown sweep key {other:?}; expected guidance, guidance-rescale, steps, spacing, eta or sampler"
                ))
            }
        };
        let values: Vec<String> = values
            .split(',')
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect();
        if values.is_empty() {
            return Err(format!("{s:?} lists no values"));
        }
        Ok(Self { key, values })
    }
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "prompts"])))]
pub struct AblateArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// --prompt is every row's prompt; a --prompts file gives one group of rows per prompt (only
    /// "prompt" is read from .jsonl lines).
    #[command(flatten)]
    pub prompts: PromptArgs,

    /// Seeds, one row each: 1,2,3.
    #[arg(long, value_delimiter = ',', conflicts_with = "num_seeds")]
    pub seeds: Vec<u64>,

    /// Rows for seeds 0..N.
    #[arg(long, default_value_t = 4, value_parser = at_least_one)]
    pub num_seeds: usize,

    /// The base settings of every cell; the columns change zero-SNR, spacing and the CFG rescale
    /// (whose phi --guidance-rescale gives the `+rescaled CFG` column), or the --sweep keys.
    #[command(flatten)]
    pub sampler: SamplerArgs,

    #[command(flatten)]
    pub size: SizeArgs,

    /// All 8 on/off combinations of zero-SNR, trailing and rescaled CFG, instead of the four
    /// cumulative columns.
    #[arg(long, conflicts_with = "sweep")]
    pub all_combinations: bool,

    /// KEY=V1,V2,... with KEY one of guidance, guidance-rescale, steps, spacing, eta, sampler; the first
    /// is the columns, a second one multiplies the rows. Replaces the fix columns.
    #[arg(long, value_name = "KEY=VALUES")]
    pub sweep: Vec<Sweep>,

    /// Folder for grid.png, grid.json and cells/.
    #[arg(long, default_value = "outputs/ablate")]
    pub out_dir: PathBuf,

    /// The most cells a grid may have.
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    pub max_cells: usize,

    /// Images per UNet batch.
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    pub batch_size: usize,

    /// Replace an existing grid.
    #[arg(long)]
    pub overwrite: bool,

    #[command(flatten)]
    pub device: DeviceArgs,

    #[command(flatten)]
    pub verbosity: VerbosityArgs,
}

/// How a column (or a row group) changes the request.
#[derive(Debug, Clone)]
struct Variant {
    label: String,
    zero_snr: Option<bool>,
    spacing: Option<TimestepSpacing>,
    guidance_rescale: Option<f64>,
    sweep: Option<(SweepKey, String)>,
}

impl Variant {
    fn fixes(label: &str, zero_snr: bool, trailing: bool, rescale: Option<f64>) -> Self {
        Self {
            label: label.to_string(),
            zero_snr: Some(zero_snr),
            spacing: Some(if trailing {
                TimestepSpacing::Trailing
            } else {
                TimestepSpacing::Leading
            }),
            guidance_rescale: Some(rescale.unwrap_or(0.0)),
            sweep: None,
        }
    }

    fn apply(&self, request: &mut Request) -> Result<()> {
        if let Some(z) = self.zero_snr {
            request.zero_snr = Some(z);
        }
        if let Some(s) = self.spacing {
            request.spacing = s;
        }
        if let Some(r) = self.guidance_rescale {
            request.guidance_rescale = r;
        }
        if let Some((key, value)) = &self.sweep {
            key.apply(request, value)?;
        }
        Ok(())
    }
}

fn sweep_variants(sweep: &Sweep) -> Vec<Variant> {
    sweep
        .values
        .iter()
        .map(|v| Variant {
            label: format!("{}={v}", sweep.key.name()),
            zero_snr: None,
            spacing: None,
            guidance_rescale: None,
            sweep: Some((sweep.key, v.clone())),
        })
        .collect()
}

fn columns(args: &AblateArgs) -> Vec<Variant> {
    let phi = Some(args.sampler.guidance_rescale);
    if let Some(first) = args.sweep.first() {
        return sweep_variants(first);
    }
    if args.all_combinations {
        let mut all = Vec::new();
        for zero_snr in [false, true] {
            for trailing in [false, true] {
                for rescale in [false, true] {
                    let names: Vec<&str> = [(zero_snr, "zero-SNR"), (trailing, "trailing"), (rescale, "rescale")]
                        .iter()
                        .filter_map(|(on, name)| on.then_some(*name))
                        .collect();
                    let label = if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join("+")
                    };
                    all.push(Variant::fixes(
                        &label,
                        zero_snr,
                        trailing,
                        rescale.then_some(args.sampler.guidance_rescale),
                    ));
                }
            }
        }
        return all;
    }
    vec![
        Variant::fixes("baseline", false, false, None),
        Variant::fixes("+zero-SNR", true, false, None),
        Variant::fixes("+trailing", true, true, None),
        Variant::fixes("+rescaled CFG", true, true, phi),
    ]
}

/// Keeps each cell's image, writing its PNG as it arrives.
struct Cells<'a> {
    progress: &'a Progress,
    /// Per job: the cell's PNG path.
    paths: Vec<PathBuf>,
    /// Per job: the image, once made.
    images: Vec<Option<GeneratedImage>>,
}

impl Observer for Cells<'_> {
    fn image(&mut self, image: GeneratedImage) -> Result<()> {
        let path = &self.paths[image.job];
        png::write_image(path, &image)?;
        self.progress.image_done(&format!("wrote {}", path.display()));
        let job = image.job;
        self.images[job] = Some(image);
        Ok(())
    }

    fn step(&mut self, _: &StepInfo) {
        self.progress.step();
    }

    fn event(&mut self, event: &Event) {
        self.progress.report(event);
    }

    fn warn(&mut self, message: &str) {
        self.progress.warn(message);
    }
}

/// The rows' prompts: --prompt, or every entry of --prompts (a bad line stops the run: a grid
/// with holes in its rows would mislead).
fn row_prompts(args: &AblateArgs) -> Result<Vec<String>> {
    match (&args.prompts.prompt, &args.prompts.prompts) {
        (Some(p), _) => Ok(vec![p.clone()]),
        (None, Some(path)) => {
            let (source, entries) = prompts::read_prompt_file(path)?;
            ensure!(
                !entries.is_empty(),
                "--prompts {source} has no prompts (only blank or # comment lines); add one prompt per line"
            );
            entries
                .into_iter()
                .map(|entry| {
                    entry
                        .map(|e| e.prompt)
                        .map_err(|e| anyhow::anyhow!("{source}:{}: {}", e.line, e.message))
                })
                .collect()
        }
        (None, None) => bail!("give --prompt or --prompts"),
    }
}

pub fn run(args: &AblateArgs) -> Result<()> {
    ensure!(
        args.sweep.len() <= 2,
        "at most two --sweep axes (columns, then rows), got {}",
        args.sweep.len()
    );
    let verbosity = args.verbosity.resolve();
    let prompts = row_prompts(args)?;
    let seeds: Vec<u64> = if args.seeds.is_empty() {
        (0..args.num_seeds as u64).collect()
    } else {
        args.seeds.clone()
    };
    let columns = columns(args);
    let row_groups: Vec<Option<Variant>> = match args.sweep.get(1) {
        Some(second) => sweep_variants(second).into_iter().map(Some).collect(),
        None => vec![None],
    };
    let mut rows: Vec<(String, &str, Option<&Variant>, u64)> = Vec::new();
    for prompt in &prompts {
        for group in &row_groups {
            for &seed in &seeds {
                let mut label = format!("seed {seed}");
                if let Some(g) = group {
                    label = format!("{} {label}", g.label);
                }
                if prompts.len() > 1 {
                    label = format!("{prompt}: {label}");
                }
                rows.push((label, prompt, group.as_ref(), seed));
            }
        }
    }
    let cell_count = rows.len() * columns.len();
    ensure!(
        cell_count <= args.max_cells,
        "the grid would have {cell_count} cells ({} rows x {} columns), more than --max-cells {}; raise it or use fewer seeds",
        rows.len(),
        columns.len(),
        args.max_cells
    );
    let grid_png = args.out_dir.join("grid.png");
    let cells_dir = args.out_dir.join("cells");
    ensure!(
        args.overwrite || !grid_png.exists(),
        "{} already exists; pass --overwrite or choose another --out-dir",
        grid_png.display()
    );

    let (device, dtype) = args.device.resolve()?;
    let mut engine = Engine::open_with(&args.model.resolve(None), &device, dtype)?;
    for note in engine.notes() {
        eprintln!("{note}");
    }

    // One job per cell; a cell whose settings cannot work (zero SNR with an epsilon model) is n/a.
    let mut jobs = Vec::new();
    let mut paths = Vec::new();
    let mut cell_jobs: Vec<Result<usize, String>> = Vec::with_capacity(cell_count);
    for (r, (_, prompt, group, seed)) in rows.iter().enumerate() {
        for (c, column) in columns.iter().enumerate() {
            let mut request = Request {
                seed: *seed,
                num_images: Some(1),
                ..base_request(prompt, &args.prompts, &args.sampler, &args.size)
            };
            let made = column
                .apply(&mut request)
                .and_then(|()| group.map_or(Ok(()), |g| g.apply(&mut request)))
                .and_then(|()| engine.job(request).map_err(|e| anyhow::anyhow!(e.render(Words::Flags))));
            match made {
                Ok(job) => {
                    cell_jobs.push(Ok(jobs.len()));
                    jobs.push(job);
                    paths.push(cells_dir.join(format!("r{r:03}-c{c:02}-{seed}-{}.png", png::slug(prompt))));
                }
                Err(err) => cell_jobs.push(Err(format!("{err:#}"))),
            }
        }
    }
    if jobs.is_empty() {
        bail!(
            "no cell of the grid can be made: {}",
            cell_jobs
                .iter()
                .filter_map(|c| c.as_ref().err())
                .next()
                .map_or("", |s| s.as_str())
        );
    }
    std::fs::create_dir_all(&cells_dir).with_context(|| format!("cannot create {}", cells_dir.display()))?;
    let progress = Progress::new(jobs.len(), verbosity);
    let mut cells = Cells {
        progress: &progress,
        images: vec![None; jobs.len()],
        paths,
    };
    engine.run(&jobs, args.batch_size, &mut cells)?;
    progress.finish();
    write_grid(args, &columns, &rows, &cell_jobs, &cells)?;
    if verbosity != Verbosity::Quiet {
        eprintln!(
            "wrote {} ({} x {} cells) and grid.json",
            grid_png.display(),
            rows.len(),
            columns.len()
        );
    }
    Ok(())
}

/// grid.png, grid.json and the cells' manifest, from the cells in memory.
fn write_grid(
    args: &AblateArgs,
    columns: &[Variant],
    rows: &[(String, &str, Option<&Variant>, u64)],
    cell_jobs: &[Result<usize, String>],
    made: &Cells,
) -> Result<()> {
    let (mut cells, mut described) = (Vec::with_capacity(cell_jobs.len()), Vec::with_capacity(cell_jobs.len()));
    let mut records = Vec::new();
    let mut size = (0, 0);
    for (index, cell) in cell_jobs.iter().enumerate() {
        let (r, c) = (index / columns.len(), index % columns.len());
        match cell {
            Ok(j) => {
                let path = &made.paths[*j];
                let image = made.images[*j]
                    .as_ref()
                    .with_context(|| format!("internal: cell {r},{c} was not made"))?;
                size = (image.width, image.height);
                let luminance = super::luminance::mean_luminance(&image.rgb);
                let file = relative(path, &args.out_dir);
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                records.push(manifest::record(name, r, image)?);
                described.push(json!({
                    "row": r, "column": c, "file": file, "luminance": luminance,
                    "settings": serde_json::to_value(&image.settings)?,
                }));
                cells.push(Cell::Image {
                    rgb: image.rgb.clone(),
                    luminance,
                });
            }
            Err(why) => {
                described.push(json!({"row": r, "column": c, "file": null, "error": why}));
                cells.push(Cell::Missing(why.clone()));
            }
        }
    }
    // n/a cells need a size: every made cell has the same one.
    let blank_len = size.0 * size.1 * 3;
    for cell in &cells {
        if let Cell::Image { rgb, .. } = cell {
            ensure!(
                rgb.len() == blank_len,
                "cells differ in size; sweep steps or spacing, not width or height"
            );
        }
    }
    // One line per cell, replaced whole: a second --overwrite run does not append a second set.
    manifest::replace(&args.out_dir.join("cells"), &records)?;
    let column_labels: Vec<String> = columns.iter().map(|c| c.label.clone()).collect();
    let row_labels: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    let canvas = grid::render(&column_labels, &row_labels, &cells, size.0, size.1);
    let grid_png = args.out_dir.join("grid.png");
    png::write_png(&grid_png, &canvas.rgb, canvas.width as u32, canvas.height as u32, &[])?;
    let report = json!({
        "model": args.model.model,
        "columns": column_labels,
        "rows": row_labels,
        "cells": described,
        "grid": "grid.png",
    });
    png::write_atomic(&args.out_dir.join("grid.json"), |tmp| {
        Ok(std::fs::write(tmp, serde_json::to_string_pretty(&report)?)?)
    })
}

/// `path` relative to `base` when it is under it, as grid.json names cells.
fn relative(path: &Path, base: &Path) -> String {
    path.strip_prefix(base).unwrap_or(path).display().to_string()
}
