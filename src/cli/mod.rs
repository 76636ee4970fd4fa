//! Command-line interface: clap structs that hold what the user typed ([`args`] has the flag
//! groups several subcommands share), and one `run` per subcommand that turns them into engine
//! requests and prints or writes what comes back. No engine types are defined here.

pub mod ablate;
pub mod args;
pub mod bench;
pub mod convert;
pub mod finetune;
pub mod generate;
pub mod info;
pub mod kernel_check;
pub mod luminance;
pub mod manifest;
pub mod probe;
pub mod progress;
pub mod prompt;
pub mod prompts;
pub mod schedule;
pub mod serve;
pub mod shard;
pub mod stats;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Stable Diffusion 2.x with the fixes of "Common Diffusion Noise Schedules and Sample Steps are
/// Flawed" (Lin et al., WACV 2024): zero terminal SNR, v-prediction, trailing timesteps and
/// rescaled classifier-free guidance.
#[derive(Debug, Parser)]
#[command(name = "sdfix", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The paper's ablation as one labelled grid: baseline -> +zero-SNR -> +trailing ->
    /// +rescaled CFG (or all 8 combinations, or --sweep axes), rows of seeds (x the prompts of a
    /// --prompts file, whose per-line settings ablate does not read).
    Ablate(Box<ablate::AblateArgs>),
    /// Time the pipeline's stages on a real SD architecture with random weights (no download).
    Bench(bench::BenchArgs),
    /// Write a single-file checkpoint (.safetensors or .ckpt, LDM layout) as a diffusers folder:
    /// configs, tokenizer, f32 or f16 safetensors.
    Convert(convert::ConvertArgs),
    /// Fine-tune a model onto the zero terminal SNR schedule with the v-prediction loss (the
    /// paper's training half): a diffusers-layout model that `generate` loads.
    Finetune(Box<finetune::FinetuneArgs>),
    /// Turn a prompt into PNG images with Stable Diffusion, the paper's fixes on by default.
    Generate(Box<generate::GenerateArgs>),
    /// Show how images were made: their AUTOMATIC1111 `parameters` and sdfix settings.
    Info(info::InfoArgs),
    /// Our CUDA kernels against candle's composite ops, and the bf16 VAE decode against f32
    /// (issue 32; run by scripts/gpu_check.sh).
    #[command(hide = true)]
    KernelCheck(kernel_check::KernelCheckArgs),
    /// Check a folder of sharded or requeued runs against the prompt file (missing, doubled and
    /// orphan images: what to requeue), or rewrite its manifest with one line per image.
    Manifest(manifest::ManifestArgs),
    /// Show what the text encoder will see of a prompt: A1111's emphasis fragments and weights,
    /// and each 75-token chunk's tokens, ids and weights (like A1111's token counter).
    Prompt(prompt::PromptCommandArgs),
    /// Does this model have the flaw? Its prediction type, zero terminal SNR and terminal SNR
    /// with where each came from, the mean luminance of "solid black background" and "solid
    /// white background" with its own settings and with the fixes, a verdict and the flags to use.
    Probe(Box<probe::ProbeArgs>),
    /// Mean luminance of images (Rec. 709 on sRGB values) with a summary, and, for folders with a
    /// manifest, its correlation with the initial-noise mean.
    Stats(stats::StatsArgs),
    /// Keep a model loaded behind AUTOMATIC1111's HTTP API (txt2img, img2img, models, samplers, options,
    /// progress, interrupt) and a web page at /, one job at a time.
    Serve(Box<serve::ServeArgs>),
    /// Print a noise schedule: terminal SNR with and without the zero-SNR rescale, and the
    /// sampled timesteps with their alpha_bar and SNR.
    Schedule(schedule::ScheduleArgs),
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Ablate(args) => ablate::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Convert(args) => convert::run(&args),
        Command::Finetune(args) => finetune::run(&args),
        Command::Generate(args) => generate::run(&args),
        Command::Info(args) => info::run(&args),
        Command::KernelCheck(args) => kernel_check::run(&args),
        Command::Manifest(args) => manifest::run(&args),
        Command::Prompt(args) => prompt::run(&args),
        Command::Probe(args) => probe::run(&args),
        Command::Schedule(args) => schedule::run(&args),
        Command::Serve(args) => serve::run(&args),
        Command::Stats(args) => stats::run(&args),
    }
}
