//! `sdfix probe --model M`: does this model have the flaw of Lin et al. 2024 (Section 3: a
//! schedule whose terminal SNR is not zero leaves the image's mean brightness in the training
//! input at t = T, so the model draws medium brightness whatever the prompt says)?
//!
//! It reports what the model says of itself (its prediction type and whether it was trained with
//! zero terminal SNR, each with where it was read or detected, and its schedule's terminal SNR)
//! and measures what it does: the mean luminance of "solid black background" and "solid white
//! background" (the prompts of the README's picture) over a few seeds, once with the model's own
//! settings (its scheduler config's spacing and zero-SNR flag, no CFG rescale: how diffusers'
//! pipeline samples it) and once with the fixes (zero SNR where the prediction type allows it,
//! trailing timesteps, CFG rescale 0.7). The verdict and the flags it recommends come from those
//! figures and the detected settings, never from the model's name. The images come from the one
//! engine, as `generate`'s and `ablate`'s do.

mod verdict;

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use clap::Args;
use serde_json::{json, Value};

use self::verdict::{advise, Advice, Facts, Measured, Row, Setting, Verdict, BLACK_AT_MOST, WHITE_AT_LEAST};
use super::ablate::models::identity;
use super::args::{at_least_one, DeviceArgs, ModelArgs, VerbosityArgs};
use super::luminance::{mean_luminance, summarize};
use super::progress::{Progress, Verbosity};
use super::schedule::describe_betas;
use crate::engine::request::{DEFAULT_GUIDANCE, DEFAULT_GUIDANCE_RESCALE};
use crate::engine::{Engine, Event, Field, GeneratedImage, Observer, Request, Words};
use crate::output::png;
use crate::pipeline::StepInfo;
use crate::sampling::{Prediction, Sampler};
use crate::schedule::{NoiseSchedule, TimestepSpacing};
use crate::weights::loader::SCHEDULER_CONFIG;

/// The two prompts whose brightness the probe measures.
const BLACK_PROMPT: &str = "solid black background";
const WHITE_PROMPT: &str = "solid white background";

/// Seeds per prompt and setting unless told otherwise: 4 already separate the demo models by a
/// wide margin (see [`BLACK_AT_MOST`]); 16 images in all keep a real model's probe short.
const DEFAULT_SEEDS: usize = 4;

/// Steps unless told otherwise: half of `generate`'s 50, since brightness does not need the fine
/// detail. On the demo models 25 and 50 steps give means within 0.01 of each other (`demo`:
/// 0.000 / 0.998 both; `demo-flawed` own settings: 0.557 / 0.605 and 0.550 / 0.606, 8 seeds).
const DEFAULT_STEPS: usize = 25;

#[derive(Debug, Args)]
pub struct ProbeArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Seeds per prompt and setting: --seed, --seed + 1, ...; a seed's images start from the same
    /// noise under both settings.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_SEEDS)]
    pub seeds: usize,

    /// The first seed.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,

    /// Sampling steps of every image.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_STEPS, value_parser = at_least_one)]
    pub steps: usize,

    /// Image width and height in pixels [default: the UNet's sample_size x the VAE factor].
    #[arg(long, value_name = "PX")]
    pub size: Option<usize>,

    /// Classifier-free guidance scale of both settings.
    #[arg(long, value_name = "W", default_value_t = DEFAULT_GUIDANCE, allow_negative_numbers = true)]
    pub guidance: f64,

    /// phi of the CFG rescale with the fixes (the model's own settings have none).
    #[arg(long, value_name = "PHI", default_value_t = DEFAULT_GUIDANCE_RESCALE, allow_negative_numbers = true)]
    pub guidance_rescale: f64,

    /// Sampler of both settings: ddim (the paper's), euler, euler_a, dpmpp_2m, dpmpp_2m_sde, unipc.
    #[arg(long, value_name = "NAME", default_value_t = Sampler::Ddim)]
    pub sampler: Sampler,

    /// What the model predicts, when its config or the detection is wrong: epsilon, v_prediction
    /// or sample [default: detected].
    #[arg(long, value_name = "TYPE")]
    pub prediction: Option<Prediction>,

    /// What to steer away from, in both settings.
    #[arg(long, value_name = "TEXT", default_value = "")]
    pub negative_prompt: String,

    /// Images per UNet batch.
    #[arg(long, value_name = "B", default_value_t = 1, value_parser = at_least_one)]
    pub batch_size: usize,

    /// Also write the probe's images to DIR (own-/fixed-PROMPT-SEED.png, with the metadata
    /// generate writes; replaced if present).
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,

    /// Print one JSON object instead of the report.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub device: DeviceArgs,

    #[command(flatten)]
    pub verbosity: VerbosityArgs,
}

fn facts(engine: &Engine, model: &str, requested: Option<Prediction>) -> Result<Facts> {
    let mut detection = engine.detection()?;
    if let Some(p) = requested {
        // A single file's detection already counts the flag; a folder's config does not.
        detection.prediction = p.name().to_string();
        detection.prediction_source = "--prediction".to_string();
    }
    let (predicts, zero_snr_applies) = engine
        .prediction(requested)
        .map_err(|e| anyhow::anyhow!(e.render(Words::Flags)))?;
    let scheduler = &engine.configs().scheduler;
    let betas = scheduler.beta_source()?;
    let stock_snr = NoiseSchedule::new(&betas, false)?.terminal_snr();
    let rescaled_snr = NoiseSchedule::new(&betas, true)?.terminal_snr();
    let identity = identity(model, model, engine, predicts, zero_snr_applies);
    // A built-in model's folder is a cache path that says nothing to the reader.
    let config = if identity["source"] == "built-in" {
        format!("{model}'s {SCHEDULER_CONFIG}")
    } else {
        engine.configs().scheduler_path.clone()
    };
    Ok(Facts {
        terminal_snr: if detection.zero_snr { rescaled_snr } else { stock_snr },
        detection,
        predicts,
        zero_snr_applies,
        stock_snr,
        rescaled_snr,
        betas: describe_betas(&betas),
        config,
        identity,
    })
}

/// Keeps each image's luminance, writing it when asked.
struct Measure<'a> {
    progress: &'a Progress,
    /// Per job, per image: the luminance once made.
    luminance: Vec<Vec<Option<f64>>>,
    /// Per job: what it is, for the progress lines.
    labels: Vec<String>,
    /// Per job, per image: where to write it.
    paths: Option<Vec<Vec<PathBuf>>>,
    size: (usize, usize),
}

impl Observer for Measure<'_> {
    fn image(&mut self, image: GeneratedImage) -> Result<()> {
        let slot = self
            .luminance
            .get_mut(image.job)
            .and_then(|images| images.get_mut(image.index))
            .context("internal: an image of no probe job")?;
        let luminance = mean_luminance(&image.rgb);
        *slot = Some(luminance);
        self.size = (image.width, image.height);
        let what = format!(
            "{}, seed {}: mean luminance {luminance:.3}",
            self.labels[image.job], image.settings.seed
        );
        match &self.paths {
            Some(paths) => {
                let path = &paths[image.job][image.index];
                png::write_image(path, &image)?;
                self.progress.image_done(&format!("{what} ({})", path.display()));
            }
            None => self.progress.image_done(&what),
        }
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

pub fn run(args: &ProbeArgs) -> Result<()> {
    // Checked here, not by clap, so that the error is one line like every other.
    ensure!(
        args.seeds >= 1,
        "--seeds {} measures nothing; give at least 1 (default {DEFAULT_SEEDS})",
        args.seeds
    );
    let verbosity = args.verbosity.resolve();
    let (device, dtype) = args.device.resolve()?;
    let mut options = args.model.resolve(None);
    options.single_file.prediction = args.prediction.map(|p| p.name().to_string());
    let mut engine = Engine::open_with(&options, &device, dtype)?;
    if verbosity != Verbosity::Quiet {
        for note in engine.notes() {
            eprintln!("{note}");
        }
    }
    let facts = facts(&engine, &args.model.model, args.prediction)?;

    // The model's own settings: its config's spacing and zero-SNR flag (the engine turns the
    // latter off, with a warning, for an epsilon model), no CFG rescale (diffusers' default).
    let own_spacing = engine
        .configs()
        .scheduler
        .spacing()
        .with_context(|| format!("{}: bad timestep_spacing", facts.config))?;
    let request = |prompt: &str| Request {
        seed: args.seed,
        num_images: Some(args.seeds),
        steps: args.steps,
        guidance: args.guidance,
        sampler: args.sampler,
        prediction: args.prediction,
        negative_prompt: args.negative_prompt.clone(),
        width: args.size,
        height: args.size,
        ..Request::new(prompt)
    };
    let own = |prompt: &str| Request {
        spacing: own_spacing,
        zero_snr: None,
        guidance_rescale: 0.0,
        ..request(prompt)
    };
    // The fixes: zero SNR only where the prediction type can take it (an epsilon model keeps its
    // betas, as `ablate`'s columns do), trailing timesteps, rescaled CFG.
    let fixed = |prompt: &str| Request {
        spacing: TimestepSpacing::Trailing,
        zero_snr: Some(facts.zero_snr_applies),
        guidance_rescale: args.guidance_rescale,
        ..request(prompt)
    };
    // Width and height are one flag here, named as the user typed it.
    let job = |request: Request| {
        engine.job(request).map_err(|e| match e.field {
            Field::Width | Field::Height => anyhow::anyhow!(e.render_as("--size", Words::Flags)),
            _ => anyhow::anyhow!(e.render(Words::Flags)),
        })
    };
    let mut jobs = vec![job(own(BLACK_PROMPT))?, job(own(WHITE_PROMPT))?];
    let fixed_jobs = [job(fixed(BLACK_PROMPT))?, job(fixed(WHITE_PROMPT))?];
    let (own_setting, fixed_setting) = (Setting::of(&jobs[0]), Setting::of(&fixed_jobs[0]));
    // The same settings twice (a model whose own are the fixes): measured once.
    let same = own_setting == fixed_setting;
    if !same {
        jobs.extend(fixed_jobs);
    }
    let mut warnings: Vec<String> = Vec::new();
    for warning in jobs.iter().flat_map(|j| &j.warnings) {
        let text = warning.render(Words::Flags);
        if !warnings.contains(&text) {
            warnings.push(text);
        }
    }
    for warning in &warnings {
        eprintln!("{warning}");
    }

    let paths = match &args.out_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create --out-dir {}", dir.display()))?;
            Some(
                jobs.iter()
                    .enumerate()
                    .map(|(j, job)| {
                        let setting = if j < 2 { "own" } else { "fixed" };
                        job.seeds
                            .iter()
                            .map(|seed| dir.join(format!("{setting}-{}-{seed}.png", png::slug(&job.request.prompt))))
                            .collect()
                    })
                    .collect(),
            )
        }
        None => None,
    };
    let progress = Progress::new(jobs.len() * args.seeds, verbosity);
    let mut measure = Measure {
        progress: &progress,
        luminance: jobs.iter().map(|j| vec![None; j.seeds.len()]).collect(),
        labels: jobs
            .iter()
            .enumerate()
            .map(|(j, job)| {
                let setting = if j < 2 { "own settings" } else { "with the fixes" };
                format!("{setting}, {:?}", job.request.prompt)
            })
            .collect(),
        paths,
        size: (0, 0),
    };
    engine.run(&jobs, args.batch_size, &mut measure)?;
    progress.finish();

    let measured = |job: usize| -> Result<Measured> {
        let per_seed: Vec<f64> = measure.luminance[job]
            .iter()
            .map(|l| l.context("internal: a probe image was not made"))
            .collect::<Result<_>>()?;
        let summary = summarize(&per_seed).context("internal: no probe image")?;
        Ok(Measured { per_seed, summary })
    };
    let own_row = Row {
        setting: own_setting,
        black: measured(0)?,
        white: measured(1)?,
    };
    let fixed_row = if same {
        Row {
            setting: fixed_setting,
            black: measured(0)?,
            white: measured(1)?,
        }
    } else {
        Row {
            setting: fixed_setting,
            black: measured(2)?,
            white: measured(3)?,
        }
    };
    let verdict = Verdict::judge(&facts, &own_row, &fixed_row);
    let advice = advise(verdict, &facts, (&own_row, &fixed_row), args);
    let report = Report {
        args,
        facts: &facts,
        own: &own_row,
        fixed: &fixed_row,
        verdict,
        advice: &advice,
        warnings: &warnings,
        size: measure.size,
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report.to_json())?)?;
    } else {
        write!(out, "{}", report.text())?;
    }
    Ok(())
}

/// Everything the probe found, for the two ways of printing it.
struct Report<'a> {
    args: &'a ProbeArgs,
    facts: &'a Facts,
    own: &'a Row,
    fixed: &'a Row,
    verdict: Verdict,
    advice: &'a Advice,
    warnings: &'a [String],
    size: (usize, usize),
}

impl Report<'_> {
    fn seeds(&self) -> Vec<u64> {
        (0..self.args.seeds as u64).map(|k| self.args.seed + k).collect()
    }

    /// What the fixes could not apply, or applied to a model not trained for it.
    fn zero_snr_note(&self) -> Option<&'static str> {
        if !self.facts.zero_snr_applies {
            Some("zero SNR skipped: an epsilon model cannot be sampled at zero terminal SNR")
        } else if !self.facts.detection.zero_snr {
            Some("zero SNR at sampling time only: the model was not trained on it")
        } else {
            None
        }
    }

    fn text(&self) -> String {
        let (facts, args) = (self.facts, self.args);
        let detection = &facts.detection;
        let mut out = String::new();
        // Writing to a String cannot fail.
        let source = self.facts.identity["source"].as_str().unwrap_or("model");
        let _ = writeln!(out, "sdfix probe: {} ({source})", args.model.model);
        let _ = writeln!(
            out,
            "prediction type    {:<14} from {}",
            facts.predicts.name(),
            detection.prediction_source
        );
        let _ = writeln!(
            out,
            "zero terminal SNR  {:<14} from {}",
            if detection.zero_snr { "yes" } else { "no" },
            detection.zero_snr_source
        );
        let rescale = if detection.zero_snr {
            format!("rescaled to zero SNR (stock: {:.6e})", facts.stock_snr)
        } else {
            format!("not rescaled (rescaled: {:.6e})", facts.rescaled_snr)
        };
        let _ = writeln!(
            out,
            "terminal SNR       {:<14} {} from {}, {rescale}",
            format!("{:.6e}", facts.terminal_snr),
            facts.betas,
            facts.config
        );
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "own settings   {} (the model's config)",
            self.own.setting.describe()
        );
        let note = self.zero_snr_note().map(|n| format!(" ({n})")).unwrap_or_default();
        let _ = writeln!(out, "with the fixes {}{note}", self.fixed.setting.describe());
        let (width, height) = self.size;
        let _ = writeln!(
            out,
            "mean luminance (0 black, 1 white), {}, {} steps, {}, CFG {}, {width}x{height}:",
            match self.seeds().as_slice() {
                [one] => format!("seed {one}"),
                seeds => format!("seeds {}..{}", seeds[0], seeds[seeds.len() - 1]),
            },
            args.steps,
            args.sampler.name(),
            args.guidance
        );
        let _ = writeln!(
            out,
            "{:<16}{:>24}{:>24}{:>8}",
            "", "black (min..max)", "white (min..max)", "gap"
        );
        for (name, row) in [("own settings", self.own), ("with the fixes", self.fixed)] {
            let cell = |m: &Measured| format!("{:.3} ({:.3}..{:.3})", m.summary.mean, m.summary.min, m.summary.max);
            let _ = writeln!(
                out,
                "{name:<16}{:>24}{:>24}{:>8.3}",
                cell(&row.black),
                cell(&row.white),
                row.gap()
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "verdict: {}", self.advice.summary);
        let _ = writeln!(
            out,
            "flags:   sdfix generate --model {} {}",
            args.model.model, self.advice.flags
        );
        if let Some(next) = &self.advice.next {
            let _ = writeln!(out, "next:    {next}");
        }
        out
    }

    fn to_json(&self) -> Value {
        let (facts, args) = (self.facts, self.args);
        let measured = |m: &Measured| {
            json!({"mean": m.summary.mean, "std": m.summary.std, "min": m.summary.min, "max": m.summary.max,
                   "per_seed": m.per_seed})
        };
        let row = |r: &Row| {
            json!({"settings": r.setting.to_json(), "black": measured(&r.black), "white": measured(&r.white),
                   "gap": r.gap(), "draws_black_and_white": r.draws_black_and_white()})
        };
        json!({
            "model": facts.identity,
            "prediction": {"type": facts.predicts.name(), "source": facts.detection.prediction_source},
            "zero_snr": {"trained": facts.detection.zero_snr, "source": facts.detection.zero_snr_source,
                         "applies_at_sampling": facts.zero_snr_applies},
            "terminal_snr": {"value": facts.terminal_snr, "stock": facts.stock_snr, "rescaled": facts.rescaled_snr,
                             "betas": facts.betas, "config": facts.config},
            "probe": {"prompts": {"black": BLACK_PROMPT, "white": WHITE_PROMPT}, "seeds": self.seeds(),
                      "steps": args.steps, "sampler": args.sampler.name(), "guidance": args.guidance,
                      "width": self.size.0, "height": self.size.1},
            "thresholds": {"black_at_most": BLACK_AT_MOST, "white_at_least": WHITE_AT_LEAST},
            "own": row(self.own),
            "fixed": row(self.fixed),
            "notes": self.zero_snr_note().into_iter().collect::<Vec<_>>(),
            "warnings": self.warnings,
            "verdict": {"code": self.verdict.code(), "flawed": self.verdict.flawed(),
                        "summary": self.advice.summary},
            "flags": self.advice.flags,
            "next": self.advice.next,
        })
    }
}
