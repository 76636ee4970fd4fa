//! What a single file predicts (epsilon or v) and whether it was trained with zero terminal SNR
//! (Lin et al. 2024, Section 3.1): nothing in an LDM checkpoint's weights says so, and sampling a
//! v-model as epsilon (or the reverse) draws noise. Each answer is the first of these found, and
//! is printed with its source (`docs/single-file.md`):
//!
//! 1. `--prediction`, `--zero-snr` / `--no-zero-snr`;
//! 2. empty `v_pred` / `ztsnr` tensors in the checkpoint (the convention of the zero-SNR
//!    v-prediction fine-tunes shared as single files, such as NoobAI-XL V-Pred; read by ComfyUI's
//!    `SDXL.model_type` and AUTOMATIC1111);
//! 3. the safetensors metadata `modelspec.prediction_type` (Stability's model spec; `v` or
//!    `epsilon`), and `modelspec.resolution` for the default size;
//! 4. a sidecar `<name>.yaml` beside the file (AUTOMATIC1111's convention): `parameterization: "v"`
//!    means v, a yaml without it epsilon; `rescale_betas_zero_snr: true` or
//!    `zero_terminal_snr: true` mean zero SNR;
//! 5. `--config DIR`'s `scheduler/scheduler_config.json`;
//! 6. SD 2.x only: AUTOMATIC1111's UNet-output test: one UNet pass at t = 999 on a constant latent
//!    of 0.5 with a constant context of 0.5; a v-model's output there is about -x0, far below the
//!    input (mean of output - input < -1), an epsilon model's is noise-like. No guess from the file
//!    name;
//! 7. otherwise epsilon (SD 1.x, SDXL) and no zero SNR.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::{Family, SingleFile, SingleFileOptions};
use crate::config::unet::UNetConfig;
use crate::model::unet::UNet2DConditionModel;
use crate::weights::weight_file::Weights;

pub const EPSILON: &str = "epsilon";
pub const V_PREDICTION: &str = "v_prediction";

/// A1111's test: the timestep, latent and context value, and the threshold on mean(out - in).
const TEST_TIMESTEP: f64 = 999.0;
const TEST_VALUE: f64 = 0.5;
const TEST_LATENT_SIZE: usize = 8;
const TEST_CONTEXT_TOKENS: usize = 2;
const TEST_THRESHOLD: f64 = -1.0;

/// The settled prediction type and zero-SNR flag, with where each came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Detection {
    /// `epsilon`, `v_prediction` or `sample` (the scheduler config's `prediction_type`).
    pub prediction: String,
    pub zero_snr: bool,
    pub prediction_source: String,
    pub zero_snr_source: String,
}

impl Detection {
    /// One line, e.g. "v-prediction and zero terminal SNR: from the checkpoint's v_pred and ztsnr
    /// keys".
    pub fn describe(&self) -> String {
        let prediction = match self.prediction.as_str() {
            V_PREDICTION => "v-prediction".to_string(),
            EPSILON => "epsilon prediction".to_string(),
            other => format!("{other} prediction"),
        };
        let zero_snr = if self.zero_snr {
            "zero terminal SNR"
        } else {
            "no zero terminal SNR"
        };
        let combined_keys = self.prediction_source == "the checkpoint's v_pred key"
            && self.zero_snr_source == "the checkpoint's ztsnr key";
        if combined_keys {
            format!("{prediction} and {zero_snr}: from the checkpoint's v_pred and ztsnr keys")
        } else if self.prediction_source == self.zero_snr_source {
            format!("{prediction} and {zero_snr}: from {}", self.prediction_source)
        } else {
            format!(
                "{prediction}: from {}; {zero_snr}: from {}",
                self.prediction_source, self.zero_snr_source
            )
        }
    }
}

/// What the sidecar yaml says.
#[derive(Debug, Clone, Default)]
struct Yaml {
    path: PathBuf,
    v: bool,
    zero_snr: Option<bool>,
}

/// Every mark found, before the order decides.
#[derive(Debug, Clone, Default)]
pub struct Marks {
    flag_prediction: Option<String>,
    flag_zero_snr: Option<bool>,
    v_pred_key: bool,
    ztsnr_key: bool,
    modelspec: Option<String>,
    /// `modelspec.resolution` ("768x768"), in pixels (the width).
    pub resolution: Option<usize>,
    yaml: Option<Yaml>,
    config_dir: Option<(String, bool, String)>,
}

/// `key: value` of a yaml line, the value without quotes.
fn yaml_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let (k, v) = line.trim().split_once(':')?;
        (k.trim() == key).then(|| v.split('#').next().unwrap_or("").trim().trim_matches(['"', '\'']))
    })
}

impl Marks {
    pub fn read(single: &SingleFile, options: &SingleFileOptions) -> Result<Self> {
        let file = single.checkpoint()?;
        let keys = file.keys();
        let metadata = file.metadata();
        let yaml_path = single.path.with_extension("yaml");
        let yaml = if yaml_path.is_file() {
            let text = std::fs::read_to_string(&yaml_path)
                .with_context(|| format!("cannot read the sidecar {}", yaml_path.display()))?;
            let truthy = |key| yaml_value(&text, key).map(|v| v.eq_ignore_ascii_case("true"));
            Some(Yaml {
                v: yaml_value(&text, "parameterization") == Some("v"),
                zero_snr: truthy("rescale_betas_zero_snr").or_else(|| truthy("zero_terminal_snr")),
                path: yaml_path,
            })
        } else {
            None
        };
        let config_dir = match (&options.config_dir, &single.configs.scheduler) {
            (Some(dir), Value::Object(scheduler)) => Some((
                scheduler
                    .get("prediction_type")
                    .and_then(Value::as_str)
                    .unwrap_or(EPSILON)
                    .to_string(),
                scheduler
                    .get("rescale_betas_zero_snr")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                format!("--config {}", dir.display()),
            )),
            _ => None,
        };
        Ok(Self {
            flag_prediction: options.prediction.clone(),
            flag_zero_snr: options.zero_snr,
            v_pred_key: keys.iter().any(|k| k == "v_pred"),
            ztsnr_key: keys.iter().any(|k| k == "ztsnr"),
            modelspec: metadata.get("modelspec.prediction_type").cloned(),
            resolution: metadata
                .get("modelspec.resolution")
                .and_then(|r| r.split('x').next()?.trim().parse().ok()),
            yaml,
            config_dir,
        })
    }
}

/// Settles prediction type and zero SNR from `marks`, running the UNet-output test when an
/// SD 2.x file has no mark of its prediction type.
pub fn detect(single: &SingleFile, marks: &Marks) -> Result<Detection> {
    let yaml_source = |y: &Yaml| {
        format!(
            "the sidecar {}",
            y.path
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        )
    };
    let modelspec = marks.modelspec.as_deref().and_then(|p| match p {
        "v" | "v_prediction" | "v-prediction" => Some(V_PREDICTION),
        "epsilon" | "eps" => Some(EPSILON),
        _ => None,
    });
    let (prediction, prediction_source) = if let Some(flag) = &marks.flag_prediction {
        (flag.clone(), "--prediction".to_string())
    } else if marks.v_pred_key {
        (V_PREDICTION.into(), "the checkpoint's v_pred key".into())
    } else if let Some(p) = modelspec {
        (p.into(), "the safetensors metadata modelspec.prediction_type".into())
    } else if let Some(yaml) = &marks.yaml {
        let p = if yaml.v { V_PREDICTION } else { EPSILON };
        (p.into(), yaml_source(yaml))
    } else if let Some((p, _, source)) = &marks.config_dir {
        (p.clone(), source.clone())
    } else if single.family == Family::Sd2 {
        let v = unet_output_test(single)?;
        let p = if v { V_PREDICTION } else { EPSILON };
        (
            p.into(),
            "the UNet-output test at t = 999 (AUTOMATIC1111's, for unmarked SD 2.x files)".into(),
        )
    } else {
        (
            EPSILON.into(),
            format!("the {} default (no mark in or beside the file)", single.family.name()),
        )
    };
    let (zero_snr, zero_snr_source) = if let Some(flag) = marks.flag_zero_snr {
        (flag, if flag { "--zero-snr" } else { "--no-zero-snr" }.to_string())
    } else if marks.ztsnr_key {
        (true, "the checkpoint's ztsnr key".into())
    } else if let Some((yaml, z)) = marks.yaml.as_ref().and_then(|y| Some((y, y.zero_snr?))) {
        (z, yaml_source(yaml))
    } else if let Some((_, z, source)) = &marks.config_dir {
        (*z, source.clone())
    } else {
        (false, "the default (no ztsnr mark)".into())
    };
    Ok(Detection {
        prediction,
        zero_snr,
        prediction_source,
        zero_snr_source,
    })
}

/// AUTOMATIC1111's `is_using_v_parameterization_for_sd2`, on our UNet: true for a v-model.
fn unet_output_test(single: &SingleFile) -> Result<bool> {
    let device = Device::Cpu;
    let config: UNetConfig = serde_json::from_value(single.configs.unet.clone())?;
    let cross = match &config.cross_attention_dim {
        crate::config::unet::PerBlock::One(c) => *c,
        crate::config::unet::PerBlock::Many(c) => c.first().copied().unwrap_or(0),
    };
    let spec = config.resolve().context(
        "the synthesised UNet config (for a model whose sizes SD's defaults do not fit, pass --config DIR, a \
         diffusers folder with its configs)",
    )?;
    let (backend, names) = single.backend(&single.unet)?;
    let label = format!("{} (UNet-output test)", single.path.display());
    let unet = Weights::from_backend(backend, names, label, DType::F32, &device)
        .build(|vb| Ok(UNet2DConditionModel::new(vb, &spec)?))?;
    let size = TEST_LATENT_SIZE;
    let latent = (Tensor::ones((1, spec.in_channels, size, size), DType::F32, &device)? * TEST_VALUE)?;
    let context = (Tensor::ones((1, TEST_CONTEXT_TOKENS, cross), DType::F32, &device)? * TEST_VALUE)?;
    let out = unet.forward(&latent, TEST_TIMESTEP, &context)?;
    let score = (out - &latent)?.mean_all()?.to_scalar::<f32>()?;
    Ok(f64::from(score) < TEST_THRESHOLD)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_values_come_without_quotes_or_comments() {
        let text = "model:\n  params:\n    parameterization: \"v\" # v-model\n";
        assert_eq!(yaml_value(text, "parameterization"), Some("v"));
        assert_eq!(yaml_value(text, "missing"), None);
    }

    #[test]
    fn both_keys_read_as_one_source() {
        let d = Detection {
            prediction: V_PREDICTION.into(),
            zero_snr: true,
            prediction_source: "the checkpoint's v_pred key".into(),
            zero_snr_source: "the checkpoint's ztsnr key".into(),
        };
        assert_eq!(
            d.describe(),
            "v-prediction and zero terminal SNR: from the checkpoint's v_pred and ztsnr keys"
        );
    }
}
