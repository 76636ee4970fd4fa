//! `sdfix convert FILE --out DIR`: a single-file checkpoint as a diffusers folder.

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::DType;
use clap::Args;

use crate::device;
use crate::sampling::Prediction;
use crate::weights::convert::{check_out, convert};
use crate::weights::single_file::{is_single_file, SingleFile, SingleFileOptions};

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// A single-file checkpoint (.safetensors or .ckpt) in the LDM layout.
    pub file: PathBuf,

    /// The diffusers folder to write (must not exist, or be empty).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// Weights dtype: f32 or f16 [default: f32].
    #[arg(long, value_parser = device::parse_dtype, default_value = "f32")]
    pub dtype: DType,

    /// A diffusers folder whose configs fit the file, instead of synthesised ones.
    #[arg(long, value_name = "DIR")]
    pub config: Option<PathBuf>,

    /// Write the UNet's EMA weights (model_ema.*).
    #[arg(long)]
    pub ema: bool,

    /// The prediction type to record, instead of the detected one.
    #[arg(long, value_name = "TYPE")]
    pub prediction: Option<Prediction>,

    /// Record zero terminal SNR (rescale_betas_zero_snr), instead of the detected value.
    #[arg(long, overrides_with = "no_zero_snr")]
    pub zero_snr: bool,

    /// Record no zero terminal SNR, instead of the detected value.
    #[arg(long, overrides_with = "zero_snr")]
    pub no_zero_snr: bool,
}

pub fn run(args: &ConvertArgs) -> Result<()> {
    if !is_single_file(&args.file) {
        bail!(
            "{} is not a single-file checkpoint (.safetensors, .ckpt, .pt or .pth)",
            args.file.display()
        );
    }
    if !matches!(args.dtype, DType::F32 | DType::F16) {
        bail!("--dtype: convert writes f32 or f16");
    }
    check_out(&args.out)?;
    let options = SingleFileOptions {
        config_dir: args.config.clone(),
        ema: args.ema,
        prediction: args.prediction.map(|p| p.name().to_string()),
        zero_snr: match (args.zero_snr, args.no_zero_snr) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        },
    };
    let single = SingleFile::open(&args.file, &options)?;
    for line in single.describe() {
        eprintln!("{line}");
    }
    let tensors = convert(&single, &args.out, args.dtype)?;
    eprintln!(
        "wrote {} ({tensors} tensors, {})",
        args.out.display(),
        device::dtype_name(args.dtype)
    );
    Ok(())
}
