//! One component's weights (UNet or text encoder) as candle `Var`s, so that a network built from
//! them computes gradients (see [`crate::model`], "Training"), named as in the weights file so
//! that saving writes the same keys back.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};

/// The weights of one component: its floating-point tensors as trainable `Var`s (f32), and
/// anything else the file holds (integer buffers such as CLIP's `position_ids`) kept as is.
#[derive(Debug)]
pub struct TrainableWeights {
    pub names: Vec<String>,
    pub vars: Vec<Var>,
    others: HashMap<String, Tensor>,
}

impl TrainableWeights {
    /// Reads a `.safetensors` file onto `device`, floating-point tensors converted to f32.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let extension = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
        if extension != "safetensors" {
            bail!(
                "{}: fine-tuning reads .safetensors weights only (convert the .bin first)",
                path.display()
            );
        }
        let tensors =
            candle_core::safetensors::load(path, device).with_context(|| format!("reading {}", path.display()))?;
        Self::from_tensors(tensors)
    }

    /// From tensors in memory (sorted by name, so the order is the same every run).
    pub fn from_tensors(tensors: HashMap<String, Tensor>) -> Result<Self> {
        let mut entries: Vec<(String, Tensor)> = tensors.into_iter().collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let (mut names, mut vars, mut others) = (Vec::new(), Vec::new(), HashMap::new());
        for (name, tensor) in entries {
            if tensor.dtype().is_float() {
                vars.push(Var::from_tensor(&tensor.to_dtype(DType::F32)?)?);
                names.push(name);
            } else {
                others.insert(name, tensor);
            }
        }
        Ok(Self { names, vars, others })
    }

    /// Name -> tensor (the `Var`s themselves, not copies) for a `VarBuilder` to build from.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        let mut map = self.others.clone();
        for (name, var) in self.names.iter().zip(&self.vars) {
            map.insert(name.clone(), var.as_tensor().clone());
        }
        map
    }

    /// `values` (one per var, e.g. the EMA weights) under the file's names, with the other
    /// tensors: what to save.
    pub fn named(&self, values: &[Tensor]) -> HashMap<String, Tensor> {
        let mut map = self.others.clone();
        for (name, value) in self.names.iter().zip(values) {
            map.insert(name.clone(), value.clone());
        }
        map
    }

    /// The current values, detached.
    pub fn values(&self) -> Vec<Tensor> {
        self.vars.iter().map(|v| v.as_tensor().detach()).collect()
    }
}

/// Writes `tensors` as a safetensors file (candle's writer, which sorts the keys).
pub fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let on_cpu: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    candle_core::safetensors::save(&on_cpu, path).with_context(|| format!("writing {}", path.display()))
}
