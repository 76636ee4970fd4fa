//! One weight file opened for building a module: its tensors (safetensors read tensor by
//! tensor, or pickled PyTorch `.bin`) fed to a candle `VarBuilder` that remembers which tensors
//! the model asked for.
//!
//! Missing tensors and shape mismatches are candle errors naming the tensor; [`Weights::build`]
//! adds the file's name and, once the module is built, reports tensors the file holds that the
//! config never asked for: a config that does not match its weights (one transformer layer fewer,
//! say) would otherwise load "fine" and compute garbage.
//!
//! A leaf of `weights`: the loader and a single file's detection both open files through it.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use super::safetensors_reader::SafetensorsReader;

/// Tensors that checkpoints carry but no module reads: buffers, not weights.
const IGNORED_TENSORS: &[&str] = &["text_model.embeddings.position_ids", "embeddings.position_ids"];

/// A backend that records the names of the tensors it served.
struct Tracked {
    inner: Box<dyn SimpleBackend>,
    used: Arc<Mutex<BTreeSet<String>>>,
}

impl Tracked {
    fn mark(&self, name: &str) {
        self.used
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string());
    }
}

impl SimpleBackend for Tracked {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.mark(name);
        self.inner.get(s, name, h, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.mark(name);
        self.inner.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// A weights file's tensors by its extension: `.safetensors` (read, not mapped: see
/// [`SafetensorsReader`]) or `.bin`/`.pt`/`.pth`/`.ckpt` (PyTorch pickle, checked first:
/// [`super::pickle_check`]).
pub(super) fn open_backend(path: &Path) -> Result<(Box<dyn SimpleBackend>, BTreeSet<String>)> {
    let label = path.display().to_string();
    if label.ends_with(".json") {
        return open_shards(path);
    }
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
    match extension {
        "safetensors" => {
            let tensors = SafetensorsReader::open(path)?;
            let names = tensors.names().cloned().collect();
            Ok((Box::new(tensors), names))
        }
        "bin" | "pt" | "pth" | "ckpt" => {
            super::pickle_check::check(path)?;
            let tensors = candle_core::pickle::PthTensors::new(path, None)
                .with_context(|| format!("{label} is not a readable PyTorch checkpoint"))?;
            super::pickle_check::check_tensors(path, &tensors)?;
            let names = tensors.tensor_infos().keys().cloned().collect();
            Ok((Box::new(tensors), names))
        }
        _ => bail!("{label}: unknown weights format (expected .safetensors or .bin)"),
    }
}

/// The files a sharded checkpoint's index (`*.safetensors.index.json`, as diffusers and
/// transformers save components over their `max_shard_size`) names, relative to its folder.
pub fn shard_files(index: &Path) -> Result<BTreeSet<String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let parsed: Index = crate::config::read_json(index)?;
    let files: BTreeSet<String> = parsed.weight_map.into_values().collect();
    for file in &files {
        if file.contains('/') || file.contains('\\') || file.starts_with('.') {
            bail!("{}: shard {file:?} is not a file beside the index", index.display());
        }
    }
    Ok(files)
}

/// A sharded checkpoint: each tensor read from the shard that holds it.
struct Shards {
    shards: Vec<Box<dyn SimpleBackend>>,
    shard_of: std::collections::HashMap<String, usize>,
}

impl Shards {
    fn shard(&self, name: &str) -> candle_core::Result<&dyn SimpleBackend> {
        let shard = self
            .shard_of
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() }.bt())?;
        Ok(self.shards[*shard].as_ref())
    }
}

impl SimpleBackend for Shards {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.shard(name)?.get(s, name, h, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.shard(name)?.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.shard_of.contains_key(name)
    }
}

/// Opens every shard an index names (the shards' own headers say which tensors each holds; a
/// name in two shards is an error).
fn open_shards(index: &Path) -> Result<(Box<dyn SimpleBackend>, BTreeSet<String>)> {
    let folder = index.parent().context("a shard index has no folder")?;
    let mut shards = Vec::new();
    let mut shard_of = std::collections::HashMap::new();
    for file in shard_files(index)? {
        let path = folder.join(&file);
        let (backend, names) = open_backend(&path).with_context(|| format!("shard of {}", index.display()))?;
        for name in names {
            if shard_of.insert(name.clone(), shards.len()).is_some() {
                bail!("{}: tensor {name} is in two shards", index.display());
            }
        }
        shards.push(backend);
    }
    let names = shard_of.keys().cloned().collect();
    Ok((Box::new(Shards { shards, shard_of }), names))
}

/// One weights file, opened.
pub struct Weights {
    label: String,
    names: BTreeSet<String>,
    used: Arc<Mutex<BTreeSet<String>>>,
    var_builder: VarBuilder<'static>,
}

impl Weights {
    /// Opens `path` by its extension: `.safetensors` (read, not mapped: see [`SafetensorsReader`])
    /// or `.bin`/`.pt`/`.pth`/`.ckpt` (PyTorch pickle). Tensors are converted to `dtype` on
    /// `device` as they are read.
    pub fn open(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let (backend, names) = open_backend(path)?;
        Ok(Self::from_backend(
            backend,
            names,
            path.display().to_string(),
            dtype,
            device,
        ))
    }

    /// Weights from tensors in memory (tests, renamed checkpoints).
    pub fn from_tensors(
        tensors: std::collections::HashMap<String, Tensor>,
        label: &str,
        dtype: DType,
        device: &Device,
    ) -> Self {
        let names = tensors.keys().cloned().collect();
        Self::from_backend(Box::new(tensors), names, label.to_string(), dtype, device)
    }

    /// Weights from any backend (a renamed single file, say); `names` are the tensors it holds.
    pub fn from_backend(
        inner: Box<dyn SimpleBackend>,
        names: BTreeSet<String>,
        label: String,
        dtype: DType,
        device: &Device,
    ) -> Self {
        let used = Arc::new(Mutex::new(BTreeSet::new()));
        let tracked = Tracked {
            inner,
            used: used.clone(),
        };
        let var_builder = VarBuilder::from_backend(Box::new(tracked), dtype, device.clone());
        Self {
            label,
            names,
            used,
            var_builder,
        }
    }

    /// The file (or checkpoint component) these weights come from, for messages.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Whether the file holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    /// Builds a module from these weights; errors name the file, and tensors the module did not
    /// read are an error too.
    pub fn build<T>(&self, build: impl FnOnce(VarBuilder<'static>) -> Result<T>) -> Result<T> {
        self.build_part(&[], build)
    }

    /// [`Weights::build`] for a module that uses part of the file on purpose: tensors whose names
    /// start with one of `unread_prefixes` (the VAE's encoder, say) are not reported.
    pub fn build_part<T>(
        &self,
        unread_prefixes: &[&str],
        build: impl FnOnce(VarBuilder<'static>) -> Result<T>,
    ) -> Result<T> {
        let module = build(self.var_builder.clone()).with_context(|| format!("loading {}", self.label))?;
        let used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        let unused: Vec<&String> = self
            .names
            .iter()
            .filter(|name| !used.contains(*name) && !IGNORED_TENSORS.contains(&name.as_str()))
            .filter(|name| !unread_prefixes.iter().any(|prefix| name.starts_with(prefix)))
            .collect();
        if let Some(first) = unused.first() {
            bail!(
                "{}: {} tensor(s) the config does not use, first {first}; does config.json match these weights?",
                self.label,
                unused.len()
            );
        }
        Ok(module)
    }
}
