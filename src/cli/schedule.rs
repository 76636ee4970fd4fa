//! `sdfix schedule`: what a noise schedule and a timestep spacing amount to, as a table or JSON.

use std::fmt::Write as _;
use std::io::Write as _;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

use super::args::ScheduleFlags;
use crate::schedule::{
    snr, stable_diffusion, BetaSchedule, BetaSource, NoiseSchedule, Schedule, ScheduleSpec, TimestepSpacing,
};
use crate::weights::files::{with_model_context, ModelFiles, ModelLocation};
use crate::weights::loader::{read_scheduler_config, ModelSource, SCHEDULER_CONFIG};
use crate::weights::single_file::SingleFileOptions;

#[derive(Debug, Args)]
pub struct ScheduleArgs {
    /// Model folder (diffusers layout) or Hugging Face repo id: read its
    /// scheduler/scheduler_config.json instead of the --beta-* flags.
    #[arg(long, value_name = "DIR|REPO",
          conflicts_with_all = ["beta_schedule", "beta_start", "beta_end", "train_timesteps"])]
    pub model: Option<String>,

    /// Hub revision (branch, tag or commit) of --model.
    #[arg(long, requires = "model")]
    pub revision: Option<String>,

    /// Beta schedule: linear, scaled_linear or squaredcos_cap_v2 [default: scaled_linear].
    #[arg(long, value_name = "NAME")]
    pub beta_schedule: Option<BetaSchedule>,

    /// First beta [default: 0.00085, SD 2.x].
    #[arg(long, value_name = "BETA")]
    pub beta_start: Option<f64>,

    /// Last beta [default: 0.012, SD 2.x].
    #[arg(long, value_name = "BETA")]
    pub beta_end: Option<f64>,

    /// Number of training timesteps T [default: 1000].
    #[arg(long, value_name = "T")]
    pub train_timesteps: Option<usize>,

    #[command(flatten)]
    pub flags: ScheduleFlags,

    /// Print one JSON object: timesteps, alphas_cumprod (all T values), terminal_snr, and the
    /// settings used.
    #[arg(long)]
    pub json: bool,
}

/// A resolved request: the spec, and where its numbers came from (for the report).
struct Resolved {
    spec: ScheduleSpec,
    source: String,
}

fn resolve(args: &ScheduleArgs) -> Result<Resolved> {
    let flags = &args.flags;
    let (betas, zero_terminal_snr, steps_offset, set_alpha_to_one, source) = match &args.model {
        Some(model) => {
            let location = ModelLocation::parse(model, args.revision.as_deref())?;
            let shown = location.to_string();
            let config = match location {
                // A single file's scheduler config is synthesised with its detected prediction type.
                location @ ModelLocation::File(_) => ModelSource::open(location, &SingleFileOptions::default())
                    .and_then(|source| source.configs())
                    .map(|configs| configs.scheduler),
                location => ModelFiles::new(location).and_then(|files| read_scheduler_config(&files)),
            }
            .map_err(|err| with_model_context(err, model))?;
            (
                config.beta_source()?,
                flags.zero_snr().unwrap_or(config.rescale_betas_zero_snr),
                flags.steps_offset.unwrap_or(config.steps_offset),
                config.set_alpha_to_one,
                format!("{shown} ({SCHEDULER_CONFIG})"),
            )
        }
        None => {
            let betas = BetaSource::Named {
                schedule: args.beta_schedule.unwrap_or(stable_diffusion::BETA_SCHEDULE),
                beta_start: args.beta_start.unwrap_or(stable_diffusion::BETA_START),
                beta_end: args.beta_end.unwrap_or(stable_diffusion::BETA_END),
                train_timesteps: args.train_timesteps.unwrap_or(stable_diffusion::TRAIN_TIMESTEPS),
            };
            betas
                .betas()
                .context("--beta-schedule/--beta-start/--beta-end/--train-timesteps")?;
            (
                betas,
                flags.zero_snr().unwrap_or(true),
                flags.steps_offset.unwrap_or(stable_diffusion::STEPS_OFFSET),
                stable_diffusion::SET_ALPHA_TO_ONE,
                "flags (defaults: Stable Diffusion 2.x)".to_string(),
            )
        }
    };
    let train_timesteps = betas.train_timesteps();
    let steps = flags.steps;
    if steps > train_timesteps {
        bail!("--steps {steps} is more than the {train_timesteps} training timesteps; use at most {train_timesteps}");
    }
    let spec = ScheduleSpec {
        betas,
        zero_terminal_snr,
        spacing: flags.spacing_or_default(),
        steps,
        steps_offset,
        set_alpha_to_one,
    };
    Ok(Resolved { spec, source })
}

pub fn run(args: &ScheduleArgs) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let Resolved { spec, source } = resolve(args)?;
    let schedule = Schedule::new(&spec).with_context(|| {
        format!(
            "--steps {} with --spacing {} and --steps-offset {}",
            spec.steps, spec.spacing, spec.steps_offset
        )
    })?;
    let stock = NoiseSchedule::new(&spec.betas, false)?;
    let rescaled = NoiseSchedule::new(&spec.betas, true)?;
    if args.json {
        let report = json!({
            "timesteps": schedule.timesteps,
            "alphas_cumprod": schedule.noise.alphas_cumprod,
            "terminal_snr": schedule.noise.terminal_snr(),
            "terminal_snr_stock": stock.terminal_snr(),
            "terminal_snr_rescaled": rescaled.terminal_snr(),
            "final_alpha_cumprod": schedule.final_alpha_cumprod,
            "zero_snr": spec.zero_terminal_snr,
            "spacing": spec.spacing.name(),
            "steps": spec.steps,
            "steps_offset": spec.steps_offset,
            "source": source,
        });
        writeln!(out, "{report}")?;
    } else {
        write!(out, "{}", table(&spec, &schedule, &stock, &rescaled, &source))?;
    }
    Ok(())
}

/// The betas in one line: `scaled_linear betas 0.00085..0.012, T = 1000` (`probe` says it too).
pub fn describe_betas(betas: &BetaSource) -> String {
    match betas {
        BetaSource::Named {
            schedule,
            beta_start,
            beta_end,
            train_timesteps,
        } if schedule.uses_beta_range() => {
            format!("{schedule} betas {beta_start}..{beta_end}, T = {train_timesteps}")
        }
        BetaSource::Named {
            schedule,
            train_timesteps,
            ..
        } => format!("{schedule} betas, T = {train_timesteps}"),
        BetaSource::Explicit(betas) => format!("trained_betas from the config, T = {}", betas.len()),
    }
}

/// The human-readable report.
fn table(
    spec: &ScheduleSpec,
    schedule: &Schedule,
    stock: &NoiseSchedule,
    rescaled: &NoiseSchedule,
    source: &str,
) -> String {
    let mut out = String::new();
    let last = stock.train_timesteps() - 1;
    let marker = |used: bool| if used { "  <- in use" } else { "" };
    // Writing to a String cannot fail.
    let _ = writeln!(out, "schedule from {source}");
    let _ = writeln!(out, "{}", describe_betas(&spec.betas));
    let _ = writeln!(
        out,
        "terminal SNR (t = {last}): stock {:.6e} (alpha_bar {:.6e}){}",
        stock.terminal_snr(),
        stock.alphas_cumprod[last],
        marker(!spec.zero_terminal_snr)
    );
    let _ = writeln!(
        out,
        "terminal SNR (t = {last}): zero-SNR rescaled {:.6e} (alpha_bar {:.6e}){}",
        rescaled.terminal_snr(),
        rescaled.alphas_cumprod[last],
        marker(spec.zero_terminal_snr)
    );
    let offset_note = if spec.spacing == TimestepSpacing::Leading {
        ""
    } else {
        " (unused: leading only)"
    };
    let _ = writeln!(
        out,
        "{} steps, {} spacing, steps_offset {}{offset_note}, alpha_bar after the last step {}",
        spec.steps, spec.spacing, spec.steps_offset, schedule.final_alpha_cumprod
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:>5}  {:>8}  {:>13}  {:>13}  {:>13}",
        "step", "timestep", "alpha_bar", "sqrt(a_bar)", "SNR"
    );
    for (index, &t) in schedule.timesteps.iter().enumerate() {
        let alpha_bar = schedule.alpha_cumprod(index);
        let _ = writeln!(
            out,
            "{:>5}  {:>8}  {:>13.6e}  {:>13.6e}  {:>13.6e}",
            index + 1,
            t,
            alpha_bar,
            alpha_bar.sqrt(),
            snr(alpha_bar)
        );
    }
    out
}
