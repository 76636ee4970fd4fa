//! `ablate`'s models: `--model`, or the values of `--sweep model=A,B` (folders, single files, hub
//! ids, built-in names, in any mix), each opened (configs only, no weights) before any cell runs,
//! so that a bad name stops the command before any work; each with a display name for the grid's
//! labels and its identity for grid.json.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use serde_json::{json, Value};

use crate::engine::{Engine, ModelOptions, Words};
use crate::sampling::Prediction;
use crate::weights::demo::DEMO_MODELS;
use crate::weights::files::ModelLocation;

/// One model of the grid.
pub struct AblateModel {
    /// What the grid's labels call it.
    pub name: String,
    /// Opened, no weights yet; taken (and dropped) when its cells have run.
    pub engine: Option<Engine>,
    /// Whether zero terminal SNR can be sampled with it (not with epsilon).
    pub zero_snr_applies: bool,
    /// Its identity, for grid.json.
    pub identity: Value,
}

/// The name a grid shows for `model`: a built-in or hub id as given, a folder by its last
/// component, a single file by its stem.
fn display_name(model: &str) -> String {
    let trimmed = model.trim_end_matches('/');
    let path = Path::new(trimmed);
    let name = if DEMO_MODELS.contains(&trimmed) {
        None
    } else if path.is_dir() {
        path.file_name()
    } else if path.is_file() {
        path.file_stem()
    } else {
        None
    };
    name.and_then(|n| n.to_str()).unwrap_or(trimmed).to_string()
}

/// Opens every model of `models` with `base`'s LoRAs and single-file options (`--ema` and
/// `--config` for the single files among them), for `prediction` (`--prediction`, which wins
/// over each config). A model that cannot be opened is an error naming it (`--sweep
/// model=NAME: ...` when `swept`).
pub fn open(
    models: &[String],
    swept: bool,
    base: &ModelOptions,
    prediction: Option<Prediction>,
    device: &Device,
    dtype: DType,
) -> Result<Vec<AblateModel>> {
    let names: Vec<String> = models.iter().map(|m| display_name(m)).collect();
    // Two models the same name (two folders called `unet`): the grid shows them as given.
    let unique = names.iter().enumerate().all(|(i, n)| !names[..i].contains(n));
    let mut opened = Vec::with_capacity(models.len());
    for (model, name) in models.iter().zip(names) {
        let name = if unique { name } else { model.clone() };
        let open_one = || -> Result<AblateModel> {
            let location = ModelLocation::parse(model, base.revision.as_deref())?;
            let mut options = ModelOptions {
                model: model.clone(),
                ..base.clone()
            };
            // --ema and --config are refused for diffusers models; in a mix they apply to the
            // single files.
            if !matches!(location, ModelLocation::File(_)) {
                options.single_file.ema = false;
                options.single_file.config_dir = None;
            }
            let engine = Engine::open_with(&options, device, dtype)?;
            let (predicts, zero_snr_applies) = engine
                .prediction(prediction)
                .map_err(|e| anyhow::anyhow!(e.render(Words::Flags)))?;
            let identity = identity(&name, model, &engine, predicts, zero_snr_applies);
            Ok(AblateModel {
                name: name.clone(),
                engine: Some(engine),
                zero_snr_applies,
                identity,
            })
        };
        let model = if swept {
            open_one().with_context(|| format!("--sweep model={model}"))?
        } else {
            open_one()?
        };
        if let Some(engine) = &model.engine {
            for note in engine.notes() {
                eprintln!(
                    "{}{note}",
                    if swept {
                        format!("{}: ", model.name)
                    } else {
                        String::new()
                    }
                );
            }
        }
        opened.push(model);
    }
    Ok(opened)
}

/// What grid.json (and `sdfix probe --json`) records of a model: where it came from (a built-in has no path worth keeping:
/// its cache folder), a single file's hash, and what it predicts and was trained with.
pub fn identity(name: &str, model: &str, engine: &Engine, predicts: Prediction, zero_snr_applies: bool) -> Value {
    let (source, path, revision) = match engine.location() {
        ModelLocation::Folder(_) if DEMO_MODELS.contains(&model) => ("built-in", None, None),
        ModelLocation::Folder(path) => ("folder", Some(path.display().to_string()), None),
        ModelLocation::File(path) => ("file", Some(path.display().to_string()), None),
        ModelLocation::Hub { repo_id, revision } => ("hub", Some(repo_id.clone()), Some(revision.clone())),
    };
    let scheduler = &engine.configs().scheduler;
    json!({
        "name": name,
        "model": model,
        "source": source,
        "path": path,
        "revision": revision,
        "hash": engine.model_hash(),
        "prediction_type": scheduler.prediction_type,
        "zero_snr": scheduler.rescale_betas_zero_snr,
        "prediction": predicts.name(),
        "zero_snr_fix": if zero_snr_applies { "applies" } else { "skipped (epsilon)" },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_are_short() {
        assert_eq!(display_name("demo-flawed"), "demo-flawed");
        assert_eq!(display_name("owner/model"), "owner/model");
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("my-model");
        std::fs::create_dir(&folder).unwrap();
        assert_eq!(display_name(&format!("{}/", folder.display())), "my-model");
        let file = dir.path().join("v2-1_768.safetensors");
        std::fs::write(&file, b"").unwrap();
        assert_eq!(display_name(file.to_str().unwrap()), "v2-1_768");
    }
}
