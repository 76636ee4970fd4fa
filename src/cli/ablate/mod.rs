//! `sdfix ablate`: the paper's ablation as one command and one labelled picture.
//!
//! Columns are the paper's progression (Lin et al. 2024, Figure 6 / Table 3): `baseline` (leading
//! timesteps, no zero-SNR rescale, no CFG rescale) -> `+zero-SNR` -> `+trailing` -> `+rescaled CFG`
//! (all fixes); or all 8 on/off combinations of those three sampler-side fixes; or one or two
//! `--sweep` axes of numeric settings. Rows are prompts x seeds. Every cell of a row starts from the
//! same noise (the seed), every cell is also a PNG with full metadata (as `generate` writes it),
//! and `grid.json` describes them all.
//!
//! **Models as an axis.** `--sweep model=A,B` (folders, single files, hub ids, built-in names)
//! makes one group of rows per model, outermost, whatever the other axes: the paper's picture is
//! the same prompt and seeds through a stock model and a fixed one, row above row, under the same
//! columns. Every model is opened (configs only) before any cell runs, so a bad name stops the
//! command at once; then the cells run model by model, each model's weights dropped before the
//! next model's load, so no two models are ever resident together.
//!
//! **Columns that apply** ([`columns`]): zero SNR cannot be sampled with an epsilon model, so for
//! one the fix columns skip it and apply the rest. The layout stays one grid with the same column
//! positions for every row: a column no model of the grid can take is left out (`demo-flawed`
//! alone: `baseline`, `+trailing`, `+rescaled CFG`); a column only some can take keeps its place
//! and in the other models' rows shows the column it then equals, captioned `= baseline`
//! (`+zero-SNR` for `demo-flawed` beside `demo`: with the fix skipped its settings are the
//! baseline's, so the cell is the baseline's image, made once), not an empty cell per seed. Which fix was skipped for which model is said
//! once, in a footnote under the grid (and in grid.json's `notes`), not per cell.

mod columns;
pub mod models;

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use serde_json::json;

use self::columns::{Sweep, SweepKey, Variant};
use self::models::AblateModel;
use super::args::{
    at_least_one, base_request, DeviceArgs, ModelArgs, PromptArgs, SamplerArgs, SizeArgs, VerbosityArgs,
};
use super::progress::{Progress, Verbosity};
use super::prompts;
use crate::engine::{release_idle_memory, Event, GeneratedImage, Job, Observer, Request, Words};
use crate::output::grid::{self, Cell};
use crate::output::{manifest, png};
use crate::pipeline::StepInfo;

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
    /// cumulative columns (those a model can take: without zero-SNR for an epsilon model).
    #[arg(long)]
    pub all_combinations: bool,

    /// KEY=V1,V2,... with KEY one of guidance, guidance-rescale, steps, spacing, eta, sampler: the
    /// first is the columns (replacing the fix columns), a second one multiplies the rows. Or
    /// model=A,B (folders, single files, hub ids, demo, demo-flawed) instead of --model: one group
    /// of rows per model, under the fix columns or the other sweeps.
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

/// Keeps each cell's image, writing its PNG as it arrives.
struct Cells<'a> {
    progress: &'a Progress,
    /// Per job (over all models): the cell's PNG path.
    paths: Vec<PathBuf>,
    /// Per job: the image, once made.
    images: Vec<Option<GeneratedImage>>,
    /// The running model's first job in `paths` (the engine numbers its own jobs from 0).
    offset: usize,
}

impl Observer for Cells<'_> {
    fn image(&mut self, image: GeneratedImage) -> Result<()> {
        let job = self.offset + image.job;
        let path = &self.paths[job];
        png::write_image(path, &image)?;
        self.progress.image_done(&format!("wrote {}", path.display()));
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

/// One row of the grid.
struct Row<'a> {
    label: String,
    model: usize,
    prompt: &'a str,
    group: Option<&'a Variant>,
    seed: u64,
}

/// What a cell is: a job (its index over all models' jobs), the cell of another column of the
/// row (this column only adds zero SNR, which the row's model cannot take: it then equals that
/// column, and shows its image), or a request the engine refused (drawn n/a with the reason).
enum Plan {
    Job(usize),
    Repeat { column: usize, job: usize },
    Refused(String),
}

/// The axes from `--sweep`, `--model` and `--all-combinations`: the models, the columns and the
/// second sweep's row groups, after the checks on their mix.
struct Axes {
    models: Vec<String>,
    swept_models: bool,
    columns: Vec<Variant>,
    /// Whether the columns are the fix columns (the zero-SNR rule applies to them).
    fix_columns: bool,
    row_groups: Vec<Option<Variant>>,
}

fn axes(args: &AblateArgs) -> Result<Axes> {
    let (model_sweeps, sweeps): (Vec<&Sweep>, Vec<&Sweep>) = args.sweep.iter().partition(|s| s.key == SweepKey::Model);
    ensure!(
        model_sweeps.len() <= 1,
        "--sweep model= is given {} times; list every model in one: --sweep model=A,B",
        model_sweeps.len()
    );
    ensure!(
        sweeps.len() <= 2,
        "at most two --sweep axes besides model= (columns, then rows), got {}",
        sweeps.len()
    );
    ensure!(
        !args.all_combinations || sweeps.is_empty(),
        "--all-combinations and --sweep {} both choose the columns; give one (--sweep model= goes with either)",
        sweeps[0].key.name()
    );
    let swept_models = !model_sweeps.is_empty();
    ensure!(
        !swept_models || args.model.revision.is_none(),
        "--revision names one hub repo's revision; with --sweep model= run one grid per revision"
    );
    let models = match model_sweeps.first() {
        Some(sweep) => sweep.values.clone(),
        None => vec![args.model.model.clone()],
    };
    let (columns, fix_columns) = match sweeps.first() {
        Some(first) => (columns::sweep_variants(first), false),
        None => (
            columns::fix_columns(args.all_combinations, args.sampler.guidance_rescale),
            true,
        ),
    };
    let row_groups = match sweeps.get(1) {
        Some(second) => columns::sweep_variants(second).into_iter().map(Some).collect(),
        None => vec![None],
    };
    Ok(Axes {
        models,
        swept_models,
        columns,
        fix_columns,
        row_groups,
    })
}

pub fn run(args: &AblateArgs) -> Result<()> {
    let axes = axes(args)?;
    let verbosity = args.verbosity.resolve();
    let prompts = row_prompts(args)?;
    let seeds: Vec<u64> = if args.seeds.is_empty() {
        (0..args.num_seeds as u64).collect()
    } else {
        args.seeds.clone()
    };
    let grid_png = args.out_dir.join("grid.png");
    ensure!(
        args.overwrite || !grid_png.exists(),
        "{} already exists; pass --overwrite or choose another --out-dir",
        grid_png.display()
    );

    // Every model opened (configs only) before any work: a bad one stops the command here.
    let (device, dtype) = args.device.resolve()?;
    let mut models = models::open(
        &axes.models,
        axes.swept_models,
        &args.model.resolve(None),
        args.sampler.prediction,
        &device,
        dtype,
    )?;
    let applies: Vec<bool> = models.iter().map(|m| m.zero_snr_applies).collect();
    let (columns, notes) = if axes.fix_columns {
        let kept = columns::applicable(axes.columns.clone(), &applies);
        let skipped: Vec<&str> = models
            .iter()
            .filter(|m| !m.zero_snr_applies)
            .map(|m| m.name.as_str())
            .collect();
        let note = columns::skipped_note(&axes.columns, &kept, &skipped);
        (kept, note.into_iter().collect::<Vec<_>>())
    } else {
        (axes.columns.clone(), Vec::new())
    };

    let mut rows: Vec<Row> = Vec::new();
    for (m, model) in models.iter().enumerate() {
        for prompt in &prompts {
            for group in &axes.row_groups {
                for &seed in &seeds {
                    let mut label = format!("seed {seed}");
                    if let Some(g) = group {
                        label = format!("{} {label}", g.label);
                    }
                    if prompts.len() > 1 {
                        label = format!("{prompt}: {label}");
                    }
                    if models.len() > 1 {
                        label = format!("{}: {label}", model.name);
                    }
                    rows.push(Row {
                        label,
                        model: m,
                        prompt,
                        group: group.as_ref(),
                        seed,
                    });
                }
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

    // One job per cell, each model's in its own list (they run model by model); a cell the model
    // cannot take is skipped, one whose settings the engine refuses is n/a.
    let cells_dir = args.out_dir.join("cells");
    let mut jobs: Vec<Vec<Job>> = models.iter().map(|_| Vec::new()).collect();
    let mut paths = Vec::new();
    let mut plans: Vec<Plan> = Vec::with_capacity(cell_count);
    for (r, row) in rows.iter().enumerate() {
        let model = &models[row.model];
        let engine = model.engine.as_ref().context("internal: a model was closed early")?;
        for (c, column) in columns.iter().enumerate() {
            if !column.applies_to(model.zero_snr_applies) {
                // The column it equals for this model is earlier in the row (zero SNR off first).
                let row_start = plans.len() - c;
                let repeat = (0..c).find_map(|k| match plans[row_start + k] {
                    Plan::Job(job) if column.reduces_to(&columns[k]) => Some(Plan::Repeat { column: k, job }),
                    _ => None,
                });
                plans.push(repeat.context("internal: no column for a skipped zero-SNR cell to repeat")?);
                continue;
            }
            let mut request = Request {
                seed: row.seed,
                num_images: Some(1),
                ..base_request(row.prompt, &args.prompts, &args.sampler, &args.size)
            };
            let made = column
                .apply(&mut request, model.zero_snr_applies)
                .and_then(|()| {
                    row.group
                        .map_or(Ok(()), |g| g.apply(&mut request, model.zero_snr_applies))
                })
                .and_then(|()| engine.job(request).map_err(|e| anyhow::anyhow!(e.render(Words::Flags))));
            match made {
                Ok(job) => {
                    plans.push(Plan::Job(paths.len()));
                    jobs[row.model].push(job);
                    let name = format!("r{r:03}-c{c:02}-{}-{}.png", row.seed, png::slug(row.prompt));
                    paths.push(cells_dir.join(name));
                }
                Err(err) => plans.push(Plan::Refused(format!("{err:#}"))),
            }
        }
    }
    if paths.is_empty() {
        bail!(
            "no cell of the grid can be made: {}",
            plans
                .iter()
                .find_map(|p| match p {
                    Plan::Refused(why) => Some(why.as_str()),
                    _ => None,
                })
                .unwrap_or("")
        );
    }
    std::fs::create_dir_all(&cells_dir).with_context(|| format!("cannot create {}", cells_dir.display()))?;
    let progress = Progress::new(paths.len(), verbosity);
    let mut cells = Cells {
        progress: &progress,
        images: vec![None; paths.len()],
        paths,
        offset: 0,
    };
    // Model by model: each engine (its weights) is dropped, and the memory it freed handed back,
    // before the next model loads.
    for (model, model_jobs) in models.iter_mut().zip(&jobs) {
        let mut engine = model.engine.take().context("internal: a model ran twice")?;
        engine.run(model_jobs, args.batch_size, &mut cells)?;
        drop(engine);
        release_idle_memory();
        cells.offset += model_jobs.len();
    }
    progress.finish();
    let layout = Layout {
        columns: &columns,
        rows: &rows,
        plans: &plans,
        models: &models,
        notes: &notes,
    };
    write_grid(args, &layout, &cells)?;
    if verbosity != Verbosity::Quiet {
        eprintln!(
            "wrote {} ({} x {} cells) and grid.json",
            grid_png.display(),
            rows.len(),
            columns.len()
        );
        for note in &notes {
            eprintln!("note: {note}");
        }
    }
    Ok(())
}

/// What the grid shows, for [`write_grid`].
struct Layout<'a> {
    columns: &'a [Variant],
    rows: &'a [Row<'a>],
    plans: &'a [Plan],
    models: &'a [AblateModel],
    notes: &'a [String],
}

/// grid.png, grid.json and the cells' manifest, from the cells in memory.
fn write_grid(args: &AblateArgs, layout: &Layout, made: &Cells) -> Result<()> {
    let columns = layout.columns;
    let (mut cells, mut described) = (Vec::with_capacity(layout.plans.len()), Vec::new());
    let mut records = Vec::new();
    let mut size = (0, 0);
    for (index, plan) in layout.plans.iter().enumerate() {
        let (r, c) = (index / columns.len(), index % columns.len());
        let model = &layout.models[layout.rows[r].model].name;
        match plan {
            Plan::Job(j) => {
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
                    "row": r, "column": c, "model": model, "file": file, "luminance": luminance,
                    "settings": serde_json::to_value(&image.settings)?,
                }));
                cells.push(Cell::Image {
                    rgb: image.rgb.clone(),
                    luminance,
                });
            }
            Plan::Repeat { column, job } => {
                let image = made.images[*job]
                    .as_ref()
                    .with_context(|| format!("internal: cell {r},{column} was not made"))?;
                let luminance = super::luminance::mean_luminance(&image.rgb);
                described.push(json!({
                    "row": r, "column": c, "model": model, "file": relative(&made.paths[*job], &args.out_dir),
                    "luminance": luminance, "skipped": "zero-SNR (an epsilon model)", "same_as_column": column,
                    "settings": serde_json::to_value(&image.settings)?,
                }));
                cells.push(Cell::Repeat {
                    rgb: image.rgb.clone(),
                    of: columns[*column].label.clone(),
                });
            }
            Plan::Refused(why) => {
                described.push(json!({"row": r, "column": c, "model": model, "file": null, "error": why}));
                cells.push(Cell::Missing(why.clone()));
            }
        }
    }
    // n/a and skipped cells need a size: every made cell has the same one.
    let blank_len = size.0 * size.1 * 3;
    for cell in &cells {
        if let Cell::Image { rgb, .. } = cell {
            ensure!(
                rgb.len() == blank_len,
                "cells differ in size; sweep steps or spacing, not width or height, and models of one size"
            );
        }
    }
    // One line per cell, replaced whole: a second --overwrite run does not append a second set.
    manifest::replace(&args.out_dir.join("cells"), &records)?;
    let column_labels: Vec<String> = columns.iter().map(|c| c.label.clone()).collect();
    let row_labels: Vec<String> = layout.rows.iter().map(|r| r.label.clone()).collect();
    let canvas = grid::render(&column_labels, &row_labels, &cells, size, layout.notes);
    let grid_png = args.out_dir.join("grid.png");
    png::write_png(&grid_png, &canvas.rgb, canvas.width as u32, canvas.height as u32, &[])?;
    let models: Vec<&serde_json::Value> = layout.models.iter().map(|m| &m.identity).collect();
    let report = json!({
        "models": models,
        "columns": column_labels,
        "rows": row_labels,
        "notes": layout.notes,
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
