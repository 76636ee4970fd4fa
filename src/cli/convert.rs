//! `sdfix convert FILE --out DIR`: a single-file checkpoint as a diffusers folder; and
//! `sdfix convert DIR --out FILE.safetensors`: a diffusers SDXL folder as one SAI-layout file (the
//! layout A1111, ComfyUI and civitai use), marked `v_pred` / `ztsnr` as its scheduler says.

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::DType;
use clap::Args;

use crate::device;
use crate::sampling::Prediction;
use crate::weights::convert::{check_out, convert, write_sdxl, Marks};
use crate::weights::files::{ModelFiles, ModelLocation};
use crate::weights::loader::ModelConfigs;
use crate::weights::single_file::{is_single_file, SingleFile, SingleFileOptions};

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// A single-file checkpoint (.safetensors or .ckpt) in the LDM layout; or a diffusers SDXL
    /// folder (or hub repo) to write as one .safetensors.
    pub file: PathBuf,

    /// The diffusers folder to write (must not exist, or be empty); for a folder given, the
    /// .safetensors file to write (must not exist).
    #[arg(long, value_name = "DIR|FILE")]
    pub out: PathBuf,

    /// Writing a single file: leave out the empty v_pred / ztsnr tensors that mark a
    /// v-prediction / zero terminal SNR model (written as the scheduler config says, or as
    /// --prediction / --zero-snr say).
    #[arg(long)]
    pub no_marks: bool,

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
    if args.file.is_dir() || args.out.extension().is_some_and(|e| e == "safetensors") {
        return to_single_file(args);
    }
    if args.no_marks {
        bail!("--no-marks applies to writing a single file (--out FILE.safetensors)");
    }
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

/// `convert DIR --out FILE.safetensors`: the folder's SDXL weights in the SAI layout.
fn to_single_file(args: &ConvertArgs) -> Result<()> {
    if args.out.extension().is_none_or(|e| e != "safetensors") {
        bail!(
            "--out {}: a diffusers folder is written as one .safetensors file; name it FILE.safetensors",
            args.out.display()
        );
    }
    if is_single_file(&args.file) {
        bail!(
            "{} is already a single file; convert writes one from a diffusers folder (or writes a single file as a folder: --out DIR)",
            args.file.display()
        );
    }
    if args.out.exists() {
        bail!("--out {} exists; choose a new file name", args.out.display());
    }
    if args.config.is_some() || args.ema {
        bail!("--config and --ema apply to reading a single file, not to writing one");
    }
    if !matches!(args.dtype, DType::F32 | DType::F16) {
        bail!("--dtype: convert writes f32 or f16");
    }
    let model = args.file.to_string_lossy();
    let files = ModelFiles::new(ModelLocation::parse(&model, None)?)?;
    let configs = ModelConfigs::read(&files)?;
    let prediction = args
        .prediction
        .map_or(configs.scheduler.prediction_type.as_str(), |p| p.name());
    let zero_snr = match (args.zero_snr, args.no_zero_snr) {
        (true, _) => true,
        (_, true) => false,
        _ => configs.scheduler.rescale_betas_zero_snr,
    };
    let marks = Marks {
        v_pred: !args.no_marks && prediction == Prediction::VPrediction.name(),
        ztsnr: !args.no_marks && zero_snr,
    };
    let tensors = write_sdxl(&files, &configs, &args.out, args.dtype, marks)?;
    let marked: Vec<&str> = [(marks.v_pred, "v_pred"), (marks.ztsnr, "ztsnr")]
        .iter()
        .filter_map(|&(on, name)| on.then_some(name))
        .collect();
    eprintln!(
        "wrote {} ({tensors} tensors, {}, SAI layout{})",
        args.out.display(),
        device::dtype_name(args.dtype),
        if marked.is_empty() {
            String::new()
        } else {
            format!(", marked {}", marked.join(" + "))
        }
    );
    Ok(())
}
