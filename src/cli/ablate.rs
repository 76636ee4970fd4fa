//! `sdfix ablate`: the paper's ablation as one command and one labelled picture.
//!
//! Columns are the paper's progression (Lin et al. 2024, Figure 6 / Table 3): `baseline` (leading
//! timesteps, no zero-SNR rescale, no CFG rescale) -> `+zero-SNR` -> `+trailing` -> `+rescaled CFG`
//! (all fixes); or all 8 on/off combinations of those three sampler-side fixes; or one or two
//! `--sweep` axes of numeric settings. Rows are prompts x seeds. Every cell of a row starts from the
//! same noise (the seed), every cell is also a PNG with full metadata (as `generate` writes it),
//! and `grid.json` describes them all.

use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{bail, ensure, Context, Result};
use candle_core::DType;
use clap::Args;
use serde_json::json;

use super::generate::{make_images, Item, ModelContext, RenderOptions, Request, RunOptions};
use super::schedule_flags::at_least_one;
use crate::device::{self, DeviceChoice};
use crate::grid::{self, Cell};
use crate::model::demo::DEFAULT_MODEL;
use crate::output;
use crate::progress::{Progress, Verbosity};
use crate::prompts;
use crate::sampler::Prediction;
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
}

impl SweepKey {
    fn name(self) -> &'static str {
        match self {
            Self::Guidance => "guidance",
            Self::GuidanceRescale => "guidance-rescale",
            Self::Steps => "steps",
            Self::Spacing => "spacing",
            Self::Eta => "eta",
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
            other => {
                return Err(format!(
                    "unknown sweep key {other:?}; expected guidance, guidance-rescale, steps, spacing or eta"
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
pub struct AblateArgs {
    /// Model folder, Hugging Face repo id, or built-in demo / demo-flawed.
    #[arg(long, value_name = "DIR|REPO|demo", default_value = DEFAULT_MODEL)]
    pub model: String,

    /// Hub revision of --model.
    #[arg(long)]
    pub revision: Option<String>,

    /// The prompt of every row.
    #[arg(long, required_unless_present = "prompts", conflicts_with = "prompts")]
    pub prompt: Option<String>,

    /// A .txt or .jsonl prompt file: one group of rows per prompt (only "prompt" is read).
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,

    /// Seeds, one row each: 1,2,3.
    #[arg(long, value_delimiter = ',', conflicts_with = "num_seeds")]
    pub seeds: Vec<u64>,

    /// Rows for seeds 0..N.
    #[arg(long, default_value_t = 4, value_parser = at_least_one)]
    pub num_seeds: usize,

    #[arg(long, default_value = "")]
    pub negative_prompt: String,

    #[arg(long, default_value_t = 50, value_parser = at_least_one)]
    pub steps: usize,

    #[arg(long, default_value_t = 7.5, allow_negative_numbers = true)]
    pub guidance: f64,

    /// phi of the `+rescaled CFG` column (and of sweeps).
    #[arg(long, default_value_t = super::generate::DEFAULT_GUIDANCE_RESCALE, allow_negative_numbers = true)]
    pub guidance_rescale: f64,

    /// epsilon, v_prediction or sample [default: the model's].
    #[arg(long, value_name = "TYPE")]
    pub prediction: Option<Prediction>,

    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub eta: f64,

    #[arg(long)]
    pub width: Option<usize>,

    #[arg(long)]
    pub height: Option<usize>,

    /// Offset added to `leading` timesteps [default: the model's].
    #[arg(long, value_name = "N")]
    pub steps_offset: Option<usize>,

    /// All 8 on/off combinations of zero-SNR, trailing and rescaled CFG, instead of the four
    /// cumulative columns.
    #[arg(long, conflicts_with = "sweep")]
    pub all_combinations: bool,

    /// KEY=V1,V2,... with KEY one of guidance, guidance-rescale, steps, spacing, eta; the first
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

    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,

    #[arg(long, value_parser = device::parse_dtype)]
    pub dtype: Option<DType>,

    /// Print only warnings and errors.
    #[arg(long, short)]
    pub quiet: bool,
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
    let phi = Some(args.guidance_rescale);
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
                        rescale.then_some(args.guidance_rescale),
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

pub fn run(args: &AblateArgs) -> Result<()> {
    ensure!(
        args.sweep.len() <= 2,
        "at most two --sweep axes (columns, then rows), got {}",
        args.sweep.len()
    );
    let verbosity = if args.quiet {
        Verbosity::Quiet
    } else {
        Verbosity::Normal
    };
    let prompts: Vec<String> = match (&args.prompt, &args.prompts) {
        (Some(p), _) => vec![p.clone()],
        (None, Some(path)) => {
            let (source, entries) = prompts::read_prompt_file(path)?;
            let mut good = Vec::new();
            for entry in entries {
                match entry {
                    Ok(e) => good.push(e.prompt),
                    Err(e) => bail!("{source}:{}: {}", e.line, e.message),
                }
            }
            good
        }
        (None, None) => bail!("give --prompt or --prompts"),
    };
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

    let context = ModelContext::open(&args.model, args.revision.as_deref())?;
    let device = device::open(args.device)?;
    let dtype = args.dtype.unwrap_or_else(|| device::default_dtype(&device));
    ensure!(
        !(device.is_cpu() && dtype == DType::BF16),
        "--dtype bf16 is not supported on the CPU; use f32 or f16"
    );
    let options = RunOptions {
        prediction: args.prediction,
        steps_offset: args.steps_offset,
        baseline: false,
        dtype,
        device,
    };

    // One job per cell; a cell whose settings cannot work (zero SNR with an epsilon model) is n/a.
    let mut jobs = Vec::new();
    let mut cell_jobs: Vec<Result<usize, String>> = Vec::with_capacity(cell_count);
    for (r, (_, prompt, group, seed)) in rows.iter().enumerate() {
        for (c, column) in columns.iter().enumerate() {
            let mut request = Request {
                line: r,
                prompt: prompt.to_string(),
                negative_prompt: args.negative_prompt.clone(),
                seed: *seed,
                steps: args.steps,
                guidance: args.guidance,
                guidance_rescale: args.guidance_rescale,
                spacing: TimestepSpacing::Trailing,
                zero_snr: None,
                eta: args.eta,
                width: args.width,
                height: args.height,
                num_images: Some(1),
            };
            let made = column
                .apply(&mut request)
                .and_then(|()| group.map_or(Ok(()), |g| g.apply(&mut request)))
                .and_then(|()| context.job(request, &options, None, &cells_dir));
            match made {
                Ok(mut job) => {
                    job.paths = vec![cells_dir.join(format!("r{r:03}-c{c:02}-{seed}-{}.png", output::slug(prompt)))];
                    cell_jobs.push(Ok(jobs.len()));
                    jobs.push(job);
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
    let items: Vec<Item> = (0..jobs.len()).map(|job| Item { job, image: 0 }).collect();
    for job in &jobs {
        if job.paths[0].exists() {
            std::fs::remove_file(&job.paths[0])
                .with_context(|| format!("cannot replace {}", job.paths[0].display()))?;
        }
    }
    std::fs::create_dir_all(&cells_dir).with_context(|| format!("cannot create {}", cells_dir.display()))?;
    let progress = Progress::new(items.len(), verbosity);
    let render = RenderOptions {
        batch_size: args.batch_size,
        save_latents: false,
        out_dir: cells_dir.clone(),
    };
    make_images(&render, &context, &options, &jobs, &items, None, &progress)?;
    progress.finish();

    // Read the cells back and lay out the grid.
    let (mut cells, mut described) = (Vec::with_capacity(cell_count), Vec::with_capacity(cell_count));
    let mut size = (0, 0);
    for (index, cell) in cell_jobs.iter().enumerate() {
        let (r, c) = (index / columns.len(), index % columns.len());
        match cell {
            Ok(j) => {
                let path = &jobs[*j].paths[0];
                let image = image::open(path)
                    .with_context(|| format!("cannot read back {}", path.display()))?
                    .to_rgb8();
                size = (image.width() as usize, image.height() as usize);
                let luminance = crate::stats::mean_luminance(image.as_raw());
                let settings: serde_json::Value = serde_json::from_str(
                    output::read_png_text(path)?
                        .get(crate::metadata::SETTINGS_CHUNK)
                        .map_or("null", |s| s.as_str()),
                )?;
                let file = path.strip_prefix(&args.out_dir).unwrap_or(path).display().to_string();
                described
                    .push(json!({"row": r, "column": c, "file": file, "luminance": luminance, "settings": settings}));
                cells.push(Cell::Image {
                    rgb: image.into_raw(),
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
    let blank = vec![0u8; size.0 * size.1 * 3];
    for cell in &mut cells {
        if let Cell::Image { rgb, .. } = cell {
            if rgb.len() != blank.len() {
                bail!("cells differ in size; sweep steps or spacing, not width or height");
            }
        }
    }
    let column_labels: Vec<String> = columns.iter().map(|c| c.label.clone()).collect();
    let row_labels: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    let canvas = grid::render(&column_labels, &row_labels, &cells, size.0, size.1);
    output::write_png(&grid_png, &canvas.rgb, canvas.width as u32, canvas.height as u32, &[])?;
    let report = json!({
        "model": args.model,
        "columns": column_labels,
        "rows": row_labels,
        "cells": described,
        "grid": "grid.png",
    });
    output::write_atomic(&args.out_dir.join("grid.json"), |tmp| {
        Ok(std::fs::write(tmp, serde_json::to_string_pretty(&report)?)?)
    })?;
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
