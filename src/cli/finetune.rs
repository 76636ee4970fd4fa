//! `sdfix finetune`: fine-tune a model onto the zero-SNR schedule with the v-prediction loss
//! (Lin et al. 2024, Sections 3.1-3.2); the loop is [`crate::training`]. Flags -> spec, a
//! progress bar (step, running loss, it/s, ETA) and Ctrl-C -> a checkpoint.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::args::{at_least_one, DeviceArgs, VerbosityArgs};
use super::progress::Verbosity;
use crate::device::{self, DeviceChoice};
use crate::training::adamw::AdamWConfig;
use crate::training::data::DataSource;
use crate::training::{FinetuneSpec, Outcome, TrainEvent, Trainer};
use crate::weights::demo::DEFAULT_MODEL;
use crate::weights::files::{with_model_context, ModelFiles, ModelLocation};
use crate::weights::loader::ModelConfigs;

/// Defaults under which `--model demo-flawed --data demo` reaches the paper's black and white
/// well inside 20 minutes on 2 CPU cores: black <= 0.08 from step 400 on, 0.006 at 500
/// (docs/brightness-study.md, "Fine-tuning demo-flawed", `scripts/finetune_study.sh`).
const DEFAULT_STEPS: &str = "500";
const DEFAULT_BATCH: &str = "16";
const DEFAULT_LR: &str = "3e-4";
const DEFAULT_WARMUP: &str = "20";
/// candle's element-wise ops (the training path's) fan out to a spin-waiting thread pool; on a
/// busy machine the spinning costs 3x the work (measured on 2 shared cores), so fine-tuning
/// runs them on one thread unless `CANDLE_NUM_THREADS` says otherwise. Our kernels and the
/// matrix products keep their own (rayon) threads.
const CANDLE_THREADS_VAR: &str = "CANDLE_NUM_THREADS";
const RAYON_THREADS_VAR: &str = "RAYON_NUM_THREADS";
/// Lines printed without a terminal: one every this many steps.
const LOG_EVERY: usize = 10;

#[derive(Debug, Args)]
pub struct FinetuneArgs {
    /// The model to fine-tune: a folder (diffusers layout), a Hugging Face repo id, or a
    /// built-in demo model (demo-flawed: trained the stock way). Single files: convert them
    /// first with `sdfix convert`.
    #[arg(long, value_name = "DIR|REPO|demo", default_value = DEFAULT_MODEL)]
    pub model: String,

    /// Hub revision (branch, tag or commit) of --model.
    #[arg(long)]
    pub revision: Option<String>,

    /// Training data: a folder of images with same-named .txt captions (or a metadata.jsonl of
    /// {"file_name", "text"}), or demo (the demo models' procedural set).
    #[arg(long, value_name = "DIR|demo")]
    pub data: String,

    /// Where the fine-tuned model (diffusers layout), checkpoints/ and train_log.jsonl go.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// Optimizer steps.
    #[arg(long, default_value = DEFAULT_STEPS, value_parser = at_least_one)]
    pub steps: usize,

    /// Examples per micro-batch.
    #[arg(long, default_value = DEFAULT_BATCH, value_parser = at_least_one)]
    pub batch_size: usize,

    /// Peak learning rate (AdamW).
    #[arg(long, default_value = DEFAULT_LR)]
    pub lr: f64,

    /// Steps of linear learning-rate warm-up; constant after.
    #[arg(long, default_value = DEFAULT_WARMUP)]
    pub warmup_steps: usize,

    /// Micro-batches per optimizer step (gradient accumulation).
    #[arg(long, default_value = "1", value_parser = at_least_one)]
    pub grad_accum: usize,

    /// Keep an exponential moving average of the weights with this decay (e.g. 0.999) and save
    /// it as the model.
    #[arg(long, value_name = "DECAY")]
    pub ema: Option<f64>,

    /// Seed of the data order, noise, timesteps and caption dropout.
    #[arg(long, default_value = "0")]
    pub seed: u64,

    /// Image side in pixels [default: 32 for demo, else the UNet's sample size x the VAE factor].
    #[arg(long, value_name = "PX")]
    pub size: Option<usize>,

    /// Train the text encoder too [default: with --data demo, whose models were trained with
    /// their text encoders (scripts/train_demo.py); frozen otherwise, as diffusers'
    /// train_text_to_image.py keeps it].
    #[arg(long, conflicts_with = "freeze_text_encoder")]
    pub train_text_encoder: bool,

    /// Keep the text encoder frozen, also with --data demo.
    #[arg(long)]
    pub freeze_text_encoder: bool,

    /// Continue from the latest checkpoint in --out (same flags).
    #[arg(long)]
    pub resume: bool,

    /// Save a checkpoint every N steps (and always at the end and on Ctrl-C).
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub save_every: Option<usize>,

    /// Clip the gradients' total norm to this (0: no clipping).
    #[arg(long, default_value = "1.0")]
    pub max_grad_norm: f64,

    /// Share of captions replaced by the empty caption, so classifier-free guidance keeps an
    /// unconditional model.
    #[arg(long, default_value = "0.1")]
    pub caption_dropout: f64,

    /// AdamW's decoupled weight decay.
    #[arg(long, default_value = "0.01")]
    pub weight_decay: f64,

    /// Accepted for clarity: an epsilon-prediction model is converted to v-prediction in any
    /// case (and the run says so).
    #[arg(long)]
    pub from_epsilon: bool,

    #[command(flatten)]
    pub device: DeviceArgs,

    #[command(flatten)]
    pub verbosity: VerbosityArgs,
}

/// Whether the text encoder trains: the flags, else only with the demo data. The demo models
/// were trained with their text encoders jointly, and demo-flawed's UNet came to ignore its text
/// (an epsilon model barely needs it), so its text encoder tells "black" from "white" by a
/// tenth of what demo's does: frozen, the fine-tuned UNet still ignored those prompts after 600
/// steps; trained, it followed them after 250 (docs/brightness-study.md). Real checkpoints'
/// text encoders are good and stay frozen.
fn text_encoder_trained(args: &FinetuneArgs, data: &DataSource) -> bool {
    if args.train_text_encoder {
        true
    } else if args.freeze_text_encoder {
        false
    } else {
        *data == DataSource::Demo
    }
}

pub fn run(args: &FinetuneArgs) -> Result<()> {
    if std::env::var_os(CANDLE_THREADS_VAR).is_none() {
        // Before any candle op reads it (its pool starts at the first parallel op).
        std::env::set_var(CANDLE_THREADS_VAR, "1");
    }
    if std::env::var_os(RAYON_THREADS_VAR).is_none() {
        // candle asks for its thread count on every matrix product, and without this variable
        // it counts the physical cores by reading /proc/cpuinfo each time (3-7% of a demo step
        // under `perf`). The value is the one rayon's pool uses anyway.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var(RAYON_THREADS_VAR, threads.to_string());
    }
    let verbosity = args.verbosity.resolve();
    let say = |message: &str| {
        if verbosity != Verbosity::Quiet {
            eprintln!("{message}");
        }
    };
    let dtype = args.device.dtype.unwrap_or(DType::F32);
    if dtype != DType::F32 {
        bail!("fine-tuning runs in f32 (mixed precision is not implemented); drop --dtype or pass --dtype f32");
    }
    let (device, _) = device::resolve(args.device.device.unwrap_or(DeviceChoice::Auto), Some(dtype))?;
    let location = ModelLocation::parse(&args.model, args.revision.as_deref())?;
    let files = ModelFiles::new(location).map_err(|e| with_model_context(e, &args.model))?;
    let configs = ModelConfigs::read(&files).map_err(|e| with_model_context(e, &args.model))?;
    let scheduler = &configs.scheduler;
    if scheduler.prediction_type != "v_prediction" || !scheduler.rescale_betas_zero_snr {
        say(&format!(
            "{}: {} prediction{}: converting to v-prediction on the zero terminal SNR schedule (--from-epsilon implied)",
            args.model,
            scheduler.prediction_type,
            if scheduler.rescale_betas_zero_snr { "" } else { ", stock schedule" },
        ));
    }
    let data = DataSource::parse(&args.data);
    let train_text_encoder = text_encoder_trained(args, &data);
    if train_text_encoder && !args.train_text_encoder {
        say("--data demo: training the text encoder too, as the demo models were trained (--freeze-text-encoder keeps it frozen)");
    }
    let spec = FinetuneSpec {
        data,
        out: args.out.clone(),
        steps: args.steps,
        batch_size: args.batch_size,
        lr: args.lr,
        warmup_steps: args.warmup_steps,
        grad_accum: args.grad_accum,
        ema_decay: args.ema,
        seed: args.seed,
        size: args.size,
        train_text_encoder,
        resume: args.resume,
        save_every: args.save_every,
        max_grad_norm: (args.max_grad_norm > 0.0).then_some(args.max_grad_norm),
        caption_dropout: args.caption_dropout,
        adamw: AdamWConfig {
            weight_decay: args.weight_decay,
            ..Default::default()
        },
    };
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)).context("installing the Ctrl-C handler")?;

    let mut report = Reporter::new(verbosity);
    let mut trainer = Trainer::new(spec, files, &configs, &device, &mut |e| report.event(e))?;
    say(&format!(
        "fine-tuning {} on {} examples: {} steps of {} x {}, lr {}, from step {}",
        args.model,
        trainer.data.len(),
        args.steps,
        args.batch_size,
        args.grad_accum,
        args.lr,
        trainer.step
    ));
    report.start(trainer.step, args.steps);
    let outcome = trainer.run(&stop, &mut |e| report.event(e))?;
    report.finish();
    match outcome {
        Outcome::Finished => say(&format!(
            "done: {} (try: sdfix generate --model {} --prompt \"...\")",
            args.out.display(),
            args.out.display()
        )),
        Outcome::Interrupted(step) => say(&format!(
            "interrupted at step {step}; continue with the same flags and --resume"
        )),
    }
    Ok(())
}

/// The progress bar on a terminal, plain lines elsewhere.
struct Reporter {
    verbosity: Verbosity,
    bar: Option<ProgressBar>,
    started: Instant,
    first_step: usize,
}

impl Reporter {
    fn new(verbosity: Verbosity) -> Self {
        Self {
            verbosity,
            bar: None,
            started: Instant::now(),
            first_step: 0,
        }
    }

    fn start(&mut self, step: usize, steps: usize) {
        self.started = Instant::now();
        self.first_step = step;
        if self.verbosity != Verbosity::Quiet && std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(steps as u64), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("step {pos}/{len} {bar:30} {msg} {per_sec} eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_position(step as u64);
            self.bar = Some(bar);
        }
    }

    fn event(&mut self, event: TrainEvent) {
        if self.verbosity == Verbosity::Quiet {
            return;
        }
        match event {
            TrainEvent::Info(line) => self.line(&line),
            TrainEvent::Encoding { done, total } => {
                if self.verbosity == Verbosity::Verbose || done == total {
                    self.line(&format!("encoded {done}/{total}"));
                }
            }
            TrainEvent::Step {
                step,
                steps,
                loss,
                running_loss,
                lr,
            } => {
                if let Some(bar) = &self.bar {
                    bar.set_position(step as u64);
                    bar.set_message(format!("loss {running_loss:.4}"));
                } else if step % LOG_EVERY == 0 || step == steps || self.verbosity == Verbosity::Verbose {
                    let done = (step - self.first_step) as f64;
                    let elapsed = self.started.elapsed().as_secs_f64();
                    let rate = done / elapsed.max(1e-9);
                    let eta = (steps - step) as f64 / rate.max(1e-9);
                    eprintln!(
                        "step {step}/{steps} loss {loss:.4} (mean {running_loss:.4}) lr {lr:.2e} {rate:.2} it/s eta {eta:.0} s"
                    );
                }
            }
            TrainEvent::Saved(path) => self.line(&format!("saved {}", path.display())),
        }
    }

    fn line(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
