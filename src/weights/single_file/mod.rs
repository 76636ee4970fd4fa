//! Single-file checkpoints in the original LDM layout (`.safetensors`, or `.ckpt` zips whose
//! pickle is checked first: [`super::pickle_check`]), as AUTOMATIC1111, ComfyUI and model hubs
//! keep them.
//!
//! Opening one:
//! 1. The keys are renamed to diffusers' ([`super::ldm_keys`]); junk keys (the training schedule's
//!    buffers, `model_ema.*` unless `--ema`, `position_ids`, `logit_scale`) are ignored and
//!    anything else no rule knows is kept as a leftover list (printed with `-v`).
//! 2. The family comes from the keys: SD 1.x (CLIP-L text encoder, `cond_stage_model.transformer`),
//!    SD 2.x (OpenCLIP ViT-H, `cond_stage_model.model`) or SDXL (`conditioner.embedders.0` CLIP-L
//!    and `.1` OpenCLIP bigG, the UNet's `label_emb`); 9 input channels mark an inpainting UNet.
//! 3. Configs: from `--config DIR` (a diffusers folder whose configs fit these weights), or
//!    synthesised ([`synthesise`]): models/arch's SD 1.5 / 2.1 configs (built into the binary)
//!    with every size the shapes tell (channels, levels, resnets and transformer depth per level,
//!    cross-attention width, projection kind, SDXL's pooled and time-id widths); heads as SD does
//!    (8 for SD 1.x, 64 channels each for SD 2.x and SDXL).
//! 4. Prediction type and zero terminal SNR ([`detect`]).
//!
//! Tensors are then read one at a time through [`Renamed`], as from a folder, from the file opened
//! again for each component load (its header freed with it, as a folder's per-file header is):
//! the weights, reads and buffers are the folder's, and the live heap peaks within 0.6 MB of the
//! folder's (docs/performance.md).

pub mod detect;
mod synthesise;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::Init;
use serde_json::{json, Value};

use self::detect::{Detection, Marks};
use self::synthesise::Tower;
use super::ldm_keys::{
    self, is_junk, OpenClip, RenameMap, Source, Transform, CLIP_PREFIX, OPEN_CLIP_PREFIX, SDXL_CLIP_PREFIX,
    SDXL_OPEN_CLIP_PREFIX, UNET_EMA_PREFIX, UNET_PREFIX, VAE_PREFIX,
};
use super::pickle_check;
use super::safetensors_reader::SafetensorsReader;

/// File extensions `--model` takes as a single-file checkpoint.
pub const EXTENSIONS: &[&str] = &["safetensors", "ckpt", "pt", "pth"];

/// Latent sizes of SD's training resolutions: 512 px, 768 px for SD 2.x v-models, 1024 px for
/// SDXL.
const SAMPLE_SIZE_512: usize = 64;
const SAMPLE_SIZE_768: usize = 96;
const SAMPLE_SIZE_1024: usize = 128;

/// What `--model FILE` is opened with besides the file.
#[derive(Debug, Clone, Default)]
pub struct SingleFileOptions {
    /// A diffusers folder whose configs (and tokenizer, if it has one) replace the synthesised
    /// ones.
    pub config_dir: Option<PathBuf>,
    /// Use the UNet's EMA weights (`model_ema.*`).
    pub ema: bool,
    /// `--prediction` and `--zero-snr`/`--no-zero-snr` as given, which win over any mark.
    pub prediction: Option<String>,
    pub zero_snr: Option<bool>,
}

/// The Stable Diffusion families a single file can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// CLIP-L text encoder (`cond_stage_model.transformer.*`), cross-attention 768.
    Sd1,
    /// OpenCLIP ViT-H text encoder (`cond_stage_model.model.*`), cross-attention 1024.
    Sd2,
    /// CLIP-L and OpenCLIP bigG (`conditioner.embedders.{0,1}`), cross-attention 768 + 1280,
    /// the `text_time` UNet (`label_emb`).
    Sdxl,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Self::Sd1 => "SD 1.x",
            Self::Sd2 => "SD 2.x",
            Self::Sdxl => "SDXL",
        }
    }
}

/// The checkpoint's tensors: a safetensors file or a checked PyTorch zip (its errors name the
/// file, as the safetensors reader's do).
pub enum Checkpoint {
    Safetensors(SafetensorsReader),
    Pickle {
        tensors: candle_core::pickle::PthTensors,
        label: String,
    },
}

impl Checkpoint {
    /// Opens `path` by its extension; a pickle is checked ([`pickle_check`]) before anything is
    /// read from it.
    pub fn open(path: &Path) -> Result<Self> {
        let label = path.display();
        match path.extension().and_then(|e| e.to_str()).unwrap_or_default() {
            "safetensors" => Ok(Self::Safetensors(SafetensorsReader::open(path)?)),
            "ckpt" | "pt" | "pth" => {
                pickle_check::check(path)?;
                // LDM checkpoints keep the weights under "state_dict"; some are the state dict.
                let tensors = candle_core::pickle::PthTensors::new(path, Some("state_dict"))
                    .or_else(|_| candle_core::pickle::PthTensors::new(path, None))
                    .with_context(|| format!("{label} is not a readable PyTorch checkpoint"))?;
                pickle_check::check_tensors(path, &tensors)?;
                Ok(Self::Pickle {
                    tensors,
                    label: label.to_string(),
                })
            }
            other => bail!("{label}: unknown checkpoint format .{other} (expected .safetensors or .ckpt)"),
        }
    }

    pub fn keys(&self) -> Vec<String> {
        match self {
            Self::Safetensors(r) => r.names().cloned().collect(),
            Self::Pickle { tensors, .. } => tensors.tensor_infos().keys().cloned().collect(),
        }
    }

    pub fn shape(&self, key: &str) -> Option<Vec<usize>> {
        match self {
            Self::Safetensors(r) => r.shape(key).map(|s| s.dims().to_vec()),
            Self::Pickle { tensors, .. } => tensors.tensor_infos().get(key).map(|i| i.layout.dims().to_vec()),
        }
    }

    /// The safetensors header's `__metadata__` (none for pickles).
    pub fn metadata(&self) -> HashMap<String, String> {
        match self {
            Self::Safetensors(r) => r.metadata().clone(),
            Self::Pickle { .. } => HashMap::new(),
        }
    }

    /// Part `k` of 3 of `key` along its first dimension; from a safetensors file only those rows
    /// are read (a single file then peaks no higher than the folder).
    pub fn load_third(&self, key: &str, k: usize, device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Self::Safetensors(r) => r.load_part(key, k, 3, device),
            Self::Pickle { label, .. } => {
                let tensor = self.load(key, device)?;
                let rows = tensor.dims().first().copied().unwrap_or(0);
                if k >= 3 || rows == 0 || !rows.is_multiple_of(3) {
                    candle_core::bail!("{label}: tensor {key} {:?} has no part {k} of 3", tensor.dims());
                }
                tensor.narrow(0, k * rows / 3, rows / 3)?.contiguous()
            }
        }
    }

    /// Reads `key` in the file's dtype.
    pub fn load(&self, key: &str, device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Self::Safetensors(r) => r.load(key, device),
            Self::Pickle { tensors, label } => tensors
                .get(key)
                .map_err(|e| candle_core::Error::Msg(format!("{label}: reading tensor {key}: {e}")))?
                .ok_or_else(|| candle_core::Error::CannotFindTensor { path: key.to_string() }.bt())?
                .to_device(device),
        }
    }
}

/// One component's tensors under diffusers names, read from the checkpoint on demand.
pub struct Renamed {
    file: Arc<Checkpoint>,
    map: Arc<RenameMap>,
}

impl Renamed {
    pub fn new(file: Arc<Checkpoint>, map: Arc<RenameMap>) -> Self {
        Self { file, map }
    }

    /// Tensor `name` (a diffusers name) as the module wants it.
    pub fn load(&self, name: &str, device: &Device) -> candle_core::Result<Tensor> {
        let source = self
            .map
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() }.bt())?;
        match source.transform {
            Transform::Same => self.file.load(&source.key, device),
            Transform::ConvToLinear => self.file.load(&source.key, device)?.flatten_from(1),
            Transform::Third(k) => self.file.load_third(&source.key, k, device),
            Transform::Transpose => self.file.load(&source.key, device)?.t()?.contiguous(),
        }
    }
}

impl SimpleBackend for Renamed {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let tensor = self.load(name, dev)?;
        if tensor.shape() != &s {
            let key = self.map.get(name).map_or("?", |source| source.key.as_str());
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name} (checkpoint key {key})"),
                expected: s,
                got: tensor.shape().clone(),
            }
            .bt());
        }
        tensor.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }
}

/// The configs of a single file, as diffusers JSON values (written as they are by `convert`).
#[derive(Debug, Clone)]
pub struct Configs {
    pub unet: Value,
    pub vae: Value,
    pub text_encoder: Value,
    /// SDXL's second text encoder; null for SD 1.x/2.x.
    pub text_encoder_2: Value,
    pub scheduler: Value,
    /// Where they came from, for messages: "synthesised for SD 2.x" or the --config folder.
    pub source: String,
}

/// A single-file checkpoint, opened: renames, configs and prediction type settled, no weight
/// read yet (except for the SD 2.x UNet-output test, see [`detect`]).
pub struct SingleFile {
    pub path: PathBuf,
    /// The opened file while [`SingleFile::open`] works; `None` after (see [`SingleFile::checkpoint`]).
    file: Option<Arc<Checkpoint>>,
    pub family: Family,
    pub unet: Arc<RenameMap>,
    pub vae: Arc<RenameMap>,
    pub text_encoder: Arc<RenameMap>,
    /// SDXL's OpenCLIP bigG, under `CLIPTextModelWithProjection`'s names.
    pub text_encoder_2: Option<Arc<RenameMap>>,
    pub configs: Configs,
    pub detection: Detection,
    /// Keys no rule consumed and no junk rule ignored.
    pub leftover: Vec<String>,
    /// The tokenizer folder of `--config`, when it has one (else the built-in CLIP BPE).
    pub tokenizer_dir: Option<PathBuf>,
}

pub(super) fn shape_of(file: &Checkpoint, map: &RenameMap, name: &str) -> Result<Vec<usize>> {
    let source = map
        .get(name)
        .with_context(|| format!("the checkpoint has no tensor for {name}"))?;
    file.shape(&source.key)
        .with_context(|| format!("the checkpoint has no tensor {}", source.key))
}

fn read_config(dir: &Path, relative: &str) -> Result<Value> {
    crate::config::read_json(&dir.join(relative)).with_context(|| {
        format!(
            "--config {}: needs {relative} (a diffusers model folder)",
            dir.display()
        )
    })
}

/// Count of `prefix N.` distinct N among `names`.
pub(super) fn count_indices<'a>(names: impl Iterator<Item = &'a String>, prefix: &str) -> usize {
    names
        .filter_map(|n| n.strip_prefix(prefix))
        .filter_map(|rest| rest.split('.').next()?.parse::<usize>().ok())
        .collect::<BTreeSet<_>>()
        .len()
}

/// One value for every block when they are all equal, else the list.
pub(super) fn per_block(values: &[usize]) -> Value {
    if values.windows(2).all(|w| w[0] == w[1]) {
        json!(values[0])
    } else {
        json!(values)
    }
}

impl SingleFile {
    /// The tokenizer folder: `--config`'s, else the built-in one of the family (CLIP-L's pads
    /// with its EOS: SD 1.x and SDXL's first; OpenCLIP's with "!").
    pub fn tokenizer_folder(&self) -> Result<PathBuf> {
        match &self.tokenizer_dir {
            Some(dir) => Ok(dir.clone()),
            None => super::demo::clip_tokenizer_folder(self.family != Family::Sd2),
        }
    }

    /// SDXL's second tokenizer folder (OpenCLIP's, which pads with "!"): `tokenizer_2` beside
    /// `--config`'s tokenizer, else the built-in one.
    pub fn tokenizer_2_folder(&self) -> Result<PathBuf> {
        let beside = self
            .tokenizer_dir
            .as_ref()
            .and_then(|dir| dir.parent())
            .map(|parent| parent.join("tokenizer_2"))
            .filter(|dir| dir.is_dir());
        match beside {
            Some(dir) => Ok(dir),
            None => super::demo::clip_tokenizer_folder(false),
        }
    }

    pub fn open(path: &Path, options: &SingleFileOptions) -> Result<Self> {
        let label = path.display().to_string();
        let file = Arc::new(Checkpoint::open(path)?);
        let keys = file.keys();
        let key_set: BTreeSet<&str> = keys.iter().map(String::as_str).collect();
        let unet_keys: BTreeSet<&str> = keys.iter().filter_map(|k| k.strip_prefix(UNET_PREFIX)).collect();
        if unet_keys.is_empty() {
            // Told here, from the header already read, rather than by reading it twice.
            if super::lora::looks_like_lora(keys.iter()) {
                bail!("{label} is a LoRA file; pass it as --lora {label} with a base --model");
            }
            bail!(
                "{label} is not a Stable Diffusion checkpoint in the LDM layout (no {UNET_PREFIX}* keys); \
                 for a diffusers model pass its folder"
            );
        }

        let has = |prefix: &str| keys.iter().any(|k| k.starts_with(prefix));
        let family = if has(SDXL_OPEN_CLIP_PREFIX) || unet_keys.iter().any(|k| k.starts_with("label_emb.")) {
            // A1111's and diffusers' SDXL test: OpenCLIP bigG under conditioner.embedders.1.
            if !has(SDXL_OPEN_CLIP_PREFIX) || !has(SDXL_CLIP_PREFIX) {
                bail!(
                    "{label} is an SDXL checkpoint without both text encoders ({SDXL_CLIP_PREFIX}* and \
                     {SDXL_OPEN_CLIP_PREFIX}*); sdfix needs the whole model in one file (an SDXL refiner, \
                     which has only the second, is not supported)"
                );
            }
            Family::Sdxl
        } else if has(OPEN_CLIP_PREFIX) {
            Family::Sd2
        } else if has(CLIP_PREFIX) {
            Family::Sd1
        } else {
            bail!(
                "{label} has no text encoder (cond_stage_model.transformer.*, cond_stage_model.model.* or \
                 conditioner.embedders.*); sdfix needs the whole model in one file"
            )
        };

        // UNet.
        let (unet_renames, layout, mut leftover) = ldm_keys::unet_renames(&unet_keys)?;
        leftover.iter_mut().for_each(|k| k.insert_str(0, UNET_PREFIX));
        let mut unet = RenameMap::new();
        for (ours, rest) in unet_renames {
            let key = if options.ema {
                let ema = format!("{UNET_EMA_PREFIX}{}", rest.replace('.', ""));
                if !key_set.contains(ema.as_str()) {
                    bail!("--ema: {label} has no EMA weights ({ema} is missing); drop --ema");
                }
                ema
            } else {
                format!("{UNET_PREFIX}{rest}")
            };
            unet.insert(
                ours,
                Source {
                    key,
                    transform: Transform::Same,
                },
            );
        }

        // VAE.
        let vae_keys: BTreeSet<&str> = keys.iter().filter_map(|k| k.strip_prefix(VAE_PREFIX)).collect();
        if vae_keys.is_empty() {
            bail!("{label} has no VAE (first_stage_model.*); sdfix needs the whole model in one file");
        }
        let (vae, vae_unknown) = ldm_keys::vae_renames(&vae_keys, |k| file.shape(&format!("{VAE_PREFIX}{k}")));
        leftover.extend(vae_unknown);

        // Configs, then the text encoder's renames (OpenCLIP's depth comes from the config).
        let mut configs = match &options.config_dir {
            Some(dir) => Configs {
                unet: read_config(dir, "unet/config.json")?,
                vae: read_config(dir, "vae/config.json")?,
                text_encoder: read_config(dir, "text_encoder/config.json")?,
                text_encoder_2: match family {
                    Family::Sdxl => read_config(dir, "text_encoder_2/config.json")?,
                    _ => Value::Null,
                },
                scheduler: crate::config::read_json(&dir.join("scheduler/scheduler_config.json"))
                    .unwrap_or(Value::Null),
                source: format!("--config {}", dir.display()),
            },
            None => Configs {
                unet: Value::Null,
                vae: synthesise::vae(&file, &vae, family)?,
                text_encoder: Value::Null,
                text_encoder_2: Value::Null,
                scheduler: Value::Null,
                source: format!("synthesised for {} from the tensor shapes", family.name()),
            },
        };
        let under = |prefix: &str| -> BTreeSet<&str> { keys.iter().filter_map(|k| k.strip_prefix(prefix)).collect() };
        // OpenCLIP's depth: --config's, else the file's (less one for SD 2: the penultimate layer).
        let open_clip = |prefix: &'static str, config: &Value, projection: bool, leftover: &mut Vec<String>| {
            let resblocks = count_indices(keys.iter(), &format!("{prefix}transformer.resblocks."));
            let layers = match config.get("num_hidden_layers").and_then(Value::as_u64) {
                Some(n) => n as usize,
                None if projection => resblocks,
                None => resblocks.saturating_sub(1),
            };
            let tower = OpenClip {
                prefix,
                layers,
                projection,
            };
            let (renames, _dropped, unknown) = ldm_keys::open_clip_renames(&under(prefix), tower);
            leftover.extend(unknown);
            renames
        };
        let clip = |prefix: &str, leftover: &mut Vec<String>| {
            let (renames, unknown) = ldm_keys::clip_renames(&under(prefix), prefix);
            leftover.extend(unknown);
            renames
        };
        let (text_encoder, text_encoder_2) = match family {
            Family::Sd1 => (clip(CLIP_PREFIX, &mut leftover), None),
            Family::Sd2 => (
                open_clip(OPEN_CLIP_PREFIX, &configs.text_encoder, false, &mut leftover),
                None,
            ),
            Family::Sdxl => (
                clip(SDXL_CLIP_PREFIX, &mut leftover),
                Some(open_clip(
                    SDXL_OPEN_CLIP_PREFIX,
                    &configs.text_encoder_2,
                    true,
                    &mut leftover,
                )),
            ),
        };
        if configs.text_encoder.is_null() {
            let kind = if family == Family::Sd2 {
                Tower::OpenClip
            } else {
                Tower::ClipL
            };
            configs.text_encoder = synthesise::text_encoder(&file, &text_encoder, kind)?;
        }
        if let (Some(second), true) = (&text_encoder_2, configs.text_encoder_2.is_null()) {
            configs.text_encoder_2 = synthesise::text_encoder(&file, second, Tower::OpenClipProjected)?;
        }
        if configs.unet.is_null() {
            let pooled = configs.text_encoder_2.get("projection_dim").and_then(Value::as_u64);
            configs.unet = synthesise::unet(&file, &unet, &layout, family, pooled.map(|p| p as usize))?;
        }
        let consumed: BTreeSet<&str> = [Some(&unet), Some(&vae), Some(&text_encoder), text_encoder_2.as_ref()]
            .into_iter()
            .flatten()
            .flat_map(|map| map.values().map(|s| s.key.as_str()))
            .collect();
        leftover.retain(|k| !is_junk(k) && !consumed.contains(k.as_str()));
        let dropped_prefixes = [
            UNET_PREFIX,
            VAE_PREFIX,
            CLIP_PREFIX,
            OPEN_CLIP_PREFIX,
            SDXL_CLIP_PREFIX,
            SDXL_OPEN_CLIP_PREFIX,
        ];
        for key in &keys {
            let known = dropped_prefixes.iter().any(|p| key.starts_with(p)) || is_junk(key);
            if !known && !leftover.contains(key) {
                leftover.push(key.clone());
            }
        }
        leftover.sort();

        let mut single = Self {
            path: path.to_path_buf(),
            file: Some(file),
            family,
            unet: Arc::new(unet),
            vae: Arc::new(vae),
            text_encoder: Arc::new(text_encoder),
            text_encoder_2: text_encoder_2.map(Arc::new),
            configs,
            detection: Detection::default(),
            leftover,
            tokenizer_dir: options
                .config_dir
                .as_ref()
                .map(|d| d.join("tokenizer"))
                .filter(|d| d.join("vocab.json").is_file() || d.join("tokenizer.json").is_file()),
        };
        let marks = Marks::read(&single, options)?;
        single.detection = detect::detect(&single, &marks)?;
        single.finish_configs(&marks);
        // Later loads open the file again, each its own header read and freed after its component
        // as from a folder: kept, the header's 1200-odd entries pushed the run's peak RSS 20-36 MB
        // above the folder's (allocator placement; docs/performance.md).
        single.file = None;
        Ok(single)
    }

    /// The synthesised scheduler config (or --config's, with the detected values written in),
    /// and the sizes that depend on the prediction type.
    fn finish_configs(&mut self, marks: &Marks) {
        let v = self.detection.prediction == detect::V_PREDICTION;
        let synthesised = self.configs.scheduler.is_null();
        if synthesised {
            self.configs.scheduler = json!({
                "_class_name": "DDIMScheduler",
                "beta_start": 0.00085,
                "beta_end": 0.012,
                "beta_schedule": "scaled_linear",
                "num_train_timesteps": 1000,
                "clip_sample": false,
                "set_alpha_to_one": false,
                "steps_offset": 1,
                "timestep_spacing": "trailing",
            });
        }
        self.configs.scheduler["prediction_type"] = json!(self.detection.prediction);
        self.configs.scheduler["rescale_betas_zero_snr"] = json!(self.detection.zero_snr);
        if self.configs.source.starts_with("synthesised") {
            let sample_size = marks.resolution.map(|px| px / 8).unwrap_or(match self.family {
                Family::Sdxl => SAMPLE_SIZE_1024,
                Family::Sd2 if v => SAMPLE_SIZE_768,
                _ => SAMPLE_SIZE_512,
            });
            self.configs.unet["sample_size"] = json!(sample_size);
            self.configs.vae["sample_size"] = json!(sample_size * 8);
            // diffusers' SD 2.x v-model configs upcast attention (the 768 model overflows in f16).
            self.configs.unet["upcast_attention"] = json!(v && self.family == Family::Sd2);
        }
    }

    /// The file's name without its extension: what AUTOMATIC1111 shows as `Model:`.
    pub fn model_name(&self) -> String {
        self.path
            .file_stem()
            .map_or_else(|| self.path.display().to_string(), |s| s.to_string_lossy().into_owned())
    }

    /// The lines to print when the model opens (the detection and its source).
    pub fn describe(&self) -> Vec<String> {
        let mut lines = vec![
            format!(
                "{}: {} checkpoint, configs {}",
                self.path.display(),
                self.family.name(),
                self.configs.source
            ),
            self.detection.describe(),
        ];
        if self.unet_in_channels() == Some(9) {
            lines.push("the UNet takes 9 channels: an inpainting model".into());
        }
        lines
    }

    fn unet_in_channels(&self) -> Option<usize> {
        self.configs
            .unet
            .get("in_channels")
            .and_then(Value::as_u64)
            .map(|n| n as usize)
    }

    /// The checkpoint's tensors: the file being opened, or afterwards the file opened again
    /// (its header read anew), to be dropped with what reads from it.
    pub fn checkpoint(&self) -> Result<Arc<Checkpoint>> {
        match &self.file {
            Some(file) => Ok(file.clone()),
            None => Ok(Arc::new(Checkpoint::open(&self.path)?)),
        }
    }

    /// A backend serving `map`'s tensors by their diffusers names.
    pub fn backend(&self, map: &Arc<RenameMap>) -> Result<(Box<dyn SimpleBackend>, BTreeSet<String>)> {
        let names = map.keys().cloned().collect();
        Ok((Box::new(Renamed::new(self.checkpoint()?, map.clone())), names))
    }
}

/// Whether `--model` names a single-file checkpoint by its extension.
pub fn is_single_file(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| EXTENSIONS.contains(&e))
}

/// For tests and `convert`: every tensor of a component under its diffusers name.
pub fn read_component(single: &SingleFile, map: &RenameMap, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    let renamed = Renamed::new(single.checkpoint()?, Arc::new(map.clone()));
    map.keys()
        .map(|name| {
            let tensor = renamed
                .load(name, device)
                .with_context(|| format!("{}: reading {name}", single.path.display()))?;
            Ok((name.clone(), tensor))
        })
        .collect()
}
