//! LoRA files merged into the weights as they load: `W += weight * scale * up @ down` (Hu et al.
//! 2021), as diffusers' `load_lora_weights` + `fuse_lora` and AUTOMATIC1111 do.
//!
//! Two formats:
//! - kohya / AUTOMATIC1111: `lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`
//!   and `lora_te_<module>...` (SDXL: `lora_te1_`, `lora_te2_` for its two text encoders), where
//!   `<module>` is the module path with `.` written `_`: the diffusers (transformers, for text
//!   encoders) path, or for SDXL's UNet the SAI/LDM one (`input_blocks_4_1_transformer_blocks_0_
//!   attn1_to_q`, as kohya's `convert_diffusers_to_sai_if_needed` writes it; mapped back with
//!   [`super::ldm_write::UNetBlocks`], as diffusers' `_convert_non_diffusers_lora_to_diffusers`
//!   does); scale = alpha / rank (1 without an alpha).
//! - diffusers' PEFT format: `unet.<module>.lora_A.weight` (down), `.lora_B.weight` (up),
//!   `text_encoder.<module>...` and `text_encoder_2.<module>...`; scale = alpha / rank when an
//!   `.alpha` is stored, else 1.
//!
//! Linear layers, 1x1 and 3x3 convolutions: `up` [out, r(, 1, 1)] and `down` [r, in(, k, k)] are
//! multiplied as matrices ([out, r] @ [r, in k k]) and the product reshaped to the weight's
//! shape. Keys that match no layer of the model are an error listing the first few. A weight of
//! 0 leaves the model untouched (its updates are not applied).
//!
//! A file is read once ([`LoraCache`]) and shared by every set ([`Loras`]) that names it, whatever
//! its weight there: a prompt file may give each line its own set.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::Init;

use super::ldm_write::UNetBlocks;
use super::safetensors_reader::SafetensorsReader;

/// The weight of a `--lora FILE` without `:WEIGHT`.
pub const DEFAULT_WEIGHT: f64 = 1.0;
/// How many unmatched keys an error lists.
const LISTED_KEYS: usize = 5;
/// A1111's LoRA short hash: the first 12 hex digits.
const SHORT_HASH_DIGITS: usize = 12;

/// `--lora FILE[:WEIGHT]` as given.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub weight: f64,
}

impl std::str::FromStr for LoraSpec {
    type Err = String;

    /// `FILE` or `FILE:WEIGHT`; a `:` followed by something that is not a number is part of the
    /// path (`c:/x.safetensors`), unless what comes before it is already a `.safetensors` file
    /// name: `a.safetensors:high` is a bad weight, not a file of that name.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some((path, weight)) = s.rsplit_once(':') {
            match weight.parse::<f64>() {
                Ok(weight) if weight.is_finite() => {
                    return Ok(Self {
                        path: PathBuf::from(path),
                        weight,
                    })
                }
                Ok(_) => return Err(format!("{s}: the weight must be a finite number")),
                Err(_) if path.ends_with(".safetensors") => {
                    return Err(format!("{s}: the weight after ':' must be a number, as in {path}:0.8"))
                }
                Err(_) => {}
            }
        }
        Ok(Self {
            path: PathBuf::from(s),
            weight: DEFAULT_WEIGHT,
        })
    }
}

/// The model parts a LoRA can change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Unet,
    TextEncoder,
    /// SDXL's OpenCLIP bigG (`text_encoder_2`).
    TextEncoder2,
}

impl Component {
    fn name(self) -> &'static str {
        match self {
            Self::Unet => "UNet",
            Self::TextEncoder => "text encoder",
            Self::TextEncoder2 => "second text encoder (text_encoder_2)",
        }
    }
}

/// How a module is named in the file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum ModuleName {
    /// kohya: the module path with `_` for `.`.
    Underscored(String),
    /// PEFT: the module path as it is.
    Dotted(String),
}

/// One low-rank update.
struct Module {
    key: String,
    component: Component,
    name: ModuleName,
    up: Tensor,
    down: Tensor,
    scale: f64,
}

/// One LoRA file, read (its weight belongs to the set that uses it: [`AppliedLora`]).
pub struct LoraFile {
    pub path: PathBuf,
    /// The file's name without extension (A1111's name for it).
    pub name: String,
    /// A1111's short hash (12 hex digits of the addnet hash).
    pub hash: String,
    /// SHA-256 of the whole file (the addnet hash skips the header, whose key names decide where
    /// each update goes): equal digests, equal updates.
    digest: String,
    modules: Vec<Module>,
}

/// One LoRA of a set, with its weight there.
#[derive(Clone)]
pub struct AppliedLora {
    pub file: Arc<LoraFile>,
    pub weight: f64,
}

/// What the PNG records about one LoRA.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraRecord {
    pub name: String,
    pub hash: String,
    pub weight: f64,
}

/// A set of LoRAs merged into one model, in order: `--lora`, or a prompt-file line's `loras`.
#[derive(Clone, Default)]
pub struct Loras {
    pub files: Vec<AppliedLora>,
}

impl std::fmt::Debug for Loras {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.files.iter().map(|l| (l.file.path.display(), l.weight)))
            .finish()
    }
}

/// What one component's merged weights depend on: the LoRAs that change it (weight not 0, some
/// module for it), in order, by content and weight. Equal keys give equal weights, bit for bit,
/// so a model loaded for one key serves every set with that key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct MergeKey(Vec<(String, u64)>);

impl MergeKey {
    /// Whether no LoRA changes the component.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// LoRA files by path, each read once however many sets name it.
#[derive(Default)]
pub struct LoraCache {
    files: HashMap<PathBuf, Arc<LoraFile>>,
}

impl LoraCache {
    /// The set `specs` names, reading the files not read yet.
    pub fn open(&mut self, specs: &[LoraSpec]) -> Result<Loras> {
        let mut files = Vec::with_capacity(specs.len());
        for spec in specs {
            let file = match self.files.get(&spec.path) {
                Some(file) => file.clone(),
                None => {
                    let file = Arc::new(LoraFile::open(&spec.path)?);
                    self.files.insert(spec.path.clone(), file.clone());
                    file
                }
            };
            files.push(AppliedLora {
                file,
                weight: spec.weight,
            });
        }
        Ok(Loras { files })
    }
}

fn as_f64(tensor: &Tensor) -> Result<f64> {
    Ok(tensor
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?
        .first()
        .copied()
        .unwrap_or(0.0))
}

impl LoraFile {
    /// Reads `path`'s updates; errors start with `LoRA <path>:`.
    pub fn open(path: &Path) -> Result<Self> {
        let label = path.display().to_string();
        let name = path
            .file_stem()
            .map_or_else(|| label.clone(), |s| s.to_string_lossy().into_owned());
        ensure!(
            path.extension().and_then(|e| e.to_str()) == Some("safetensors"),
            "LoRA {label}: LoRA files must be .safetensors"
        );
        let reader = SafetensorsReader::open(path).with_context(|| format!("LoRA {label}"))?;
        let (addnet, digest) = super::hash::addnet_and_file_sha256(path)?;
        let hash = addnet[..SHORT_HASH_DIGITS].to_string();
        let device = Device::Cpu;
        // Group the keys by module: (prefix before .lora_*) -> parts.
        let mut groups: BTreeMap<String, BTreeMap<&'static str, String>> = BTreeMap::new();
        let mut unknown = Vec::new();
        for key in reader.names() {
            let part = [
                (".lora_down.weight", "down"),
                (".lora_up.weight", "up"),
                (".lora_A.weight", "down"),
                (".lora_B.weight", "up"),
                (".alpha", "alpha"),
            ]
            .iter()
            .find_map(|(suffix, part)| key.strip_suffix(suffix).map(|m| (m.to_string(), *part)));
            match part {
                Some((module, part)) => {
                    groups.entry(module).or_default().insert(part, key.clone());
                }
                None => unknown.push(key.clone()),
            }
        }
        let mut modules = Vec::new();
        for (module, parts) in &groups {
            let underscored = [
                ("lora_unet_", Component::Unet),
                ("lora_te_", Component::TextEncoder),
                ("lora_te1_", Component::TextEncoder),
                ("lora_te2_", Component::TextEncoder2),
            ];
            let dotted = [
                ("unet.", Component::Unet),
                ("text_encoder.", Component::TextEncoder),
                ("text_encoder_2.", Component::TextEncoder2),
            ];
            let found = underscored
                .iter()
                .find_map(|(p, c)| {
                    module
                        .strip_prefix(p)
                        .map(|m| (*c, ModuleName::Underscored(m.to_string())))
                })
                .or_else(|| {
                    dotted
                        .iter()
                        .find_map(|(p, c)| module.strip_prefix(p).map(|m| (*c, ModuleName::Dotted(m.to_string()))))
                });
            let (component, name) = if let Some(found) = found {
                found
            } else {
                unknown.push(module.clone());
                continue;
            };
            let (Some(up), Some(down)) = (parts.get("up"), parts.get("down")) else {
                bail!("LoRA {label}: module {module} has no lora_up/lora_down (or lora_B/lora_A) pair");
            };
            let up = reader.load(up, &device)?.to_dtype(DType::F32)?;
            let down = reader.load(down, &device)?.to_dtype(DType::F32)?;
            // up [out, rank(, 1, 1)], down [rank, in(, k, k)]: anything else is no update.
            let (up_dims, down_dims) = (up.dims(), down.dims());
            ensure!(
                up_dims.len() >= 2 && down_dims.len() >= 2 && up_dims[2..].iter().all(|&d| d == 1),
                "LoRA {label}: module {module}: up {up_dims:?} and down {down_dims:?} are not [out, rank(, 1, 1)] and [rank, in(, k, k)]"
            );
            let rank = down_dims[0];
            ensure!(
                up_dims[1] == rank,
                "LoRA {label}: module {module}: up has rank {} but down {rank}",
                up_dims[1]
            );
            let scale = match parts.get("alpha") {
                Some(alpha) => as_f64(&reader.load(alpha, &device)?)? / rank as f64,
                None => 1.0,
            };
            modules.push(Module {
                key: module.clone(),
                component,
                name,
                up: up.flatten_from(1)?,
                down: down.flatten_from(1)?,
                scale,
            });
        }
        if !unknown.is_empty() {
            unknown.sort();
            bail!(
                "LoRA {label}: {} key(s) of no known LoRA format (kohya lora_unet_/lora_te_/lora_te1_/lora_te2_, or diffusers unet./text_encoder./text_encoder_2.), first: {}",
                unknown.len(),
                unknown.iter().take(LISTED_KEYS).cloned().collect::<Vec<_>>().join(", ")
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            name,
            hash,
            digest,
            modules,
        })
    }
}

impl Loras {
    /// Reads every LoRA of `specs` (those of weight 0 are hashed for the record but not applied).
    pub fn open(specs: &[LoraSpec]) -> Result<Self> {
        LoraCache::default().open(specs)
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    pub fn records(&self) -> Vec<LoraRecord> {
        self.files
            .iter()
            .map(|l| LoraRecord {
                name: l.file.name.clone(),
                hash: l.file.hash.clone(),
                weight: l.weight,
            })
            .collect()
    }

    /// The LoRAs whose updates `component` gets.
    fn active(&self, component: Component) -> impl Iterator<Item = &AppliedLora> {
        self.files
            .iter()
            .filter(move |l| l.weight != 0.0 && l.file.modules.iter().any(|m| m.component == component))
    }

    /// What `component`'s weights depend on ([`MergeKey`]).
    pub fn merge_key(&self, component: Component) -> MergeKey {
        MergeKey(
            self.active(component)
                .map(|l| (l.file.digest.clone(), l.weight.to_bits()))
                .collect(),
        )
    }

    /// What both text encoders' merged weights depend on (SDXL's two are encoded together).
    pub fn text_merge_key(&self) -> MergeKey {
        let mut key = self.merge_key(Component::TextEncoder).0;
        let second = self.merge_key(Component::TextEncoder2).0;
        if !second.is_empty() {
            // A separator no digest equals: [A] + [B] is not [A, B] + [].
            key.push(("text_encoder_2".into(), 0));
            key.extend(second);
        }
        MergeKey(key)
    }

    /// Checks that every module of every LoRA for `component` matches one of `names` (the
    /// component's tensors, diffusers names), as [`Loras::patch`] will need.
    pub fn check(&self, component: Component, names: &BTreeSet<String>) -> Result<()> {
        self.updates(component, names).map(|_| ())
    }

    /// `inner` with every LoRA update for `component` added; `names` are the tensors the component
    /// has (diffusers names). A LoRA module that matches none of them is an error.
    pub fn patch(
        &self,
        component: Component,
        inner: Box<dyn SimpleBackend>,
        names: &BTreeSet<String>,
    ) -> Result<Box<dyn SimpleBackend>> {
        if self.active(component).next().is_none() {
            return Ok(inner);
        }
        let updates = self.updates(component, names)?;
        Ok(Box::new(Patched { inner, updates }))
    }

    /// The updates for `component`, by the tensor they change.
    fn updates(&self, component: Component, names: &BTreeSet<String>) -> Result<HashMap<String, Vec<Update>>> {
        let mut updates: HashMap<String, Vec<Update>> = HashMap::new();
        if self.active(component).next().is_none() {
            return Ok(updates);
        }
        // Text encoder weights are named with transformers 4's `text_model.` level or without it
        // (transformers 5); LoRA files name them either way: both spellings find the weight.
        let mut underscored: HashMap<String, &String> = HashMap::new();
        let mut dotted: HashMap<String, &String> = HashMap::new();
        for name in names {
            let Some(module) = name.strip_suffix(".weight") else {
                continue;
            };
            let bare = module.strip_prefix("text_model.").unwrap_or(module);
            for spelling in [bare.to_string(), format!("text_model.{bare}")] {
                underscored.insert(spelling.replace('.', "_"), name);
                dotted.insert(spelling, name);
            }
        }
        if component == Component::Unet {
            // kohya's SDXL files name UNet modules in the SAI/LDM layout.
            let blocks = UNetBlocks::from_names(names.iter().map(String::as_str));
            for name in names {
                let Some(module) = name.strip_suffix(".weight") else {
                    continue;
                };
                if let Some(ldm) = blocks.ldm_name(module) {
                    underscored.entry(ldm.replace('.', "_")).or_insert(name);
                }
            }
        }
        for applied in self.active(component) {
            let file = &applied.file;
            let mut unmatched = Vec::new();
            for module in file.modules.iter().filter(|m| m.component == component) {
                let target = match &module.name {
                    ModuleName::Underscored(m) => underscored.get(m).map(|n| (*n).clone()),
                    ModuleName::Dotted(m) => dotted.get(m).map(|n| (*n).clone()),
                };
                match target {
                    Some(target) => updates.entry(target).or_default().push(Update {
                        source: format!("LoRA {}: module {}", file.path.display(), module.key),
                        up: module.up.clone(),
                        down: module.down.clone(),
                        factor: applied.weight * module.scale,
                    }),
                    None => unmatched.push(module.key.clone()),
                }
            }
            if !unmatched.is_empty() {
                bail!(
                    "LoRA {}: {} module(s) match no layer of the model's {}, first: {}",
                    file.path.display(),
                    unmatched.len(),
                    component.name(),
                    unmatched
                        .iter()
                        .take(LISTED_KEYS)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        Ok(updates)
    }
}

/// `factor * up @ down`, added to one weight.
struct Update {
    /// `LoRA <path>: module <key>`, for errors.
    source: String,
    up: Tensor,
    down: Tensor,
    factor: f64,
}

/// A backend whose weights get their LoRA updates as they are read.
struct Patched {
    inner: Box<dyn SimpleBackend>,
    updates: HashMap<String, Vec<Update>>,
}

impl Patched {
    fn apply(&self, name: &str, tensor: Tensor, dtype: DType) -> candle_core::Result<Tensor> {
        let Some(updates) = self.updates.get(name) else {
            return tensor.to_dtype(dtype);
        };
        let device = tensor.device().clone();
        let shape: Shape = tensor.shape().clone();
        let mut merged = tensor.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        for update in updates {
            // Checked before the product, whose size the file's shapes set.
            let (out, inputs) = (update.up.dim(0)?, update.down.dim(1)?);
            if shape.dims().first() != Some(&out) || out.checked_mul(inputs) != Some(shape.elem_count()) {
                candle_core::bail!(
                    "{}: its update is {out}x{inputs}, which does not fit {name} {:?}",
                    update.source,
                    shape.dims()
                );
            }
            // (out, r) @ (r, in k k) -> (out, in k k), as the weight's shape.
            let delta = (update.up.matmul(&update.down)? * update.factor)?.reshape(&shape)?;
            merged = (merged + delta)?;
        }
        merged.to_dtype(dtype)?.to_device(&device)
    }
}

impl SimpleBackend for Patched {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        // Read in f32 so the update adds at full precision, then convert.
        let tensor = self.inner.get(s, name, h, DType::F32, dev)?;
        self.apply(name, tensor, dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let tensor = self.inner.get_unchecked(name, DType::F32, dev)?;
        self.apply(name, tensor, dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// Whether a file with these tensor names is a kohya LoRA (for `--model` messages).
pub fn looks_like_lora<'a>(mut names: impl Iterator<Item = &'a String>) -> bool {
    names.any(|n| n.starts_with("lora_unet_") || n.starts_with("lora_te_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_and_without_weight() {
        let spec: LoraSpec = "a/b.safetensors:0.5".parse().unwrap();
        assert_eq!(spec.weight, 0.5);
        assert_eq!(spec.path, PathBuf::from("a/b.safetensors"));
        let spec: LoraSpec = "c:/x/b.safetensors".parse().unwrap();
        assert_eq!(spec.weight, DEFAULT_WEIGHT);
        assert_eq!(spec.path, PathBuf::from("c:/x/b.safetensors"));
    }

    #[test]
    fn a_weight_that_is_not_a_finite_number_is_an_error() {
        for bad in [
            "a.safetensors:high",
            "a.safetensors:inf",
            "a.safetensors:NaN",
            "a.safetensors:",
        ] {
            let err = bad.parse::<LoraSpec>().unwrap_err();
            assert!(err.starts_with(bad) && err.contains("weight"), "{bad}: {err}");
        }
    }
}
