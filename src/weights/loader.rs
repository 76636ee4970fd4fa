//! The one loader: a model's configs read once ([`ModelConfigs`]), each component's weight file
//! chosen by dtype, and weights (safetensors read tensor by tensor, or pickled PyTorch `.bin`) fed
//! to a candle `VarBuilder` that remembers which tensors the model asked for.
//!
//! Weight files: with f16/bf16, `*.fp16.safetensors` is preferred when the model ships it (half
//! the download); then `*.safetensors` (read tensor by tensor, not mapped), then pickled `*.bin`
//! (the paper's ByteDance checkpoints ship only those).
//!
//! Each weight file is opened as a [`Weights`] ([`super::weight_file`]), which checks that the
//! module read every tensor the file holds.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::var_builder::SimpleBackend;

use super::files::{ModelFiles, ModelLocation};
use super::lora::{Component as LoraComponent, Loras};
use super::single_file::detect::Detection;
use super::single_file::{SingleFile, SingleFileOptions};
use super::vae_file::SeparateVae;
use super::weight_file::open_backend;
pub use super::weight_file::Weights;
use crate::config::clip::ClipTextConfig;
use crate::config::read_json;
use crate::config::scheduler::SchedulerConfig;
use crate::config::unet::{UNetConfig, UNetSpec};
use crate::config::vae::VaeConfig;
use crate::model::clip::ClipTextTransformer;
use crate::model::stable_diffusion::{ClipEncoder, StableDiffusion, TextEncoder};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::{Vae, VaeEncoder};

/// What to do when a single file's synthesised configs do not fit it.
const CONFIG_HINT: &str =
    "for a model whose sizes SD's defaults do not fit, pass --config DIR (a diffusers folder with its configs)";

/// Where the scheduler config lives in the diffusers layout.
pub const SCHEDULER_CONFIG: &str = "scheduler/scheduler_config.json";
const TEXT_ENCODER_CONFIG: &str = "text_encoder/config.json";
const TEXT_ENCODER_2_CONFIG: &str = "text_encoder_2/config.json";
const MODEL_INDEX: &str = "model_index.json";
const UNET_CONFIG: &str = "unet/config.json";
const VAE_CONFIG: &str = "vae/config.json";

/// Weight file names to try, in order of preference, for a component.
fn weight_candidates(component: &str, stem: &str, dtype: DType) -> Vec<String> {
    let half = matches!(dtype, DType::F16 | DType::BF16);
    // A sharded component's index stands for its shards (diffusers' variant naming).
    let full = [
        format!("{component}/{stem}.safetensors"),
        format!("{component}/{stem}.safetensors.index.json"),
        format!("{component}/{stem}.bin"),
    ];
    let fp16 = [
        format!("{component}/{stem}.fp16.safetensors"),
        format!("{component}/{stem}.safetensors.index.fp16.json"),
        format!("{component}/{stem}.fp16.bin"),
    ];
    if half {
        // Half precision: safetensors (whole, then sharded) of either precision before a pickle.
        [&fp16[..2], &full[..2], &fp16[2..], &full[2..]].concat()
    } else {
        // f32: the full-precision file in any format before an f16 one.
        [&full[..], &fp16[..]].concat()
    }
}

/// The first of `candidates` present, with a sharded checkpoint's shards fetched beside its index.
fn first_weight_file(files: &ModelFiles, candidates: &[String]) -> Result<PathBuf> {
    let path = files.first_present(candidates)?;
    if path.to_string_lossy().ends_with(".json") {
        let chosen = candidates
            .iter()
            .find(|c| path.to_string_lossy().ends_with(c.as_str()))
            .context("internal: the shard index is none of the candidates")?;
        let folder = chosen.rsplit_once('/').map_or("", |(folder, _)| folder);
        for shard in super::weight_file::shard_files(&path)? {
            files.get(&format!("{folder}/{shard}"))?;
        }
    }
    Ok(path)
}

/// The weight file `component` (`unet`, `text_encoder`, `vae`) would load from at `dtype`
/// (fine-tuning reads and copies them).
pub fn component_weight_file(files: &ModelFiles, component: &str, dtype: DType) -> Result<PathBuf> {
    first_weight_file(files, &weight_candidates(component, weight_stem(component), dtype))
}

/// transformers saves `model.*`, diffusers `diffusion_pytorch_model.*`.
fn weight_stem(component: &str) -> &'static str {
    if component.starts_with("text_encoder") {
        "model"
    } else {
        "diffusion_pytorch_model"
    }
}

/// What `model_index.json` says beyond the components: SDXL's `force_zeros_for_empty_prompt`
/// (diffusers' `StableDiffusionXLPipeline` default: true).
#[derive(Debug, Clone, Default, serde::Deserialize)]
struct ModelIndex {
    force_zeros_for_empty_prompt: Option<bool>,
    /// `["transformers", "CLIPTextModelWithProjection"]` for SDXL; null or absent otherwise.
    text_encoder_2: Option<serde_json::Value>,
}

/// A model's configs, read and validated once: enough to check every request before any weight
/// is read, and then to build the modules.
#[derive(Debug, Clone)]
pub struct ModelConfigs {
    pub scheduler: SchedulerConfig,
    /// Where the scheduler config came from, for messages.
    pub scheduler_path: String,
    pub unet: UNetSpec,
    pub vae: VaeConfig,
    pub text_encoder: ClipTextConfig,
    /// SDXL's second text encoder (OpenCLIP bigG with its projection).
    pub text_encoder_2: Option<ClipTextConfig>,
    /// SDXL: an empty negative prompt's embeddings are zeros (the pipeline config's
    /// `force_zeros_for_empty_prompt`, true unless the model says otherwise).
    pub force_zeros_for_empty_prompt: bool,
    /// `--vae`: another VAE than the model's (its config is then [`Self::vae`]).
    pub separate_vae: Option<Arc<SeparateVae>>,
}

impl ModelConfigs {
    /// Uses the VAE at `path` (`--vae DIR|FILE`) instead of the model's: its config when it has
    /// one, which must give the UNet's latent channels.
    pub fn use_vae(&mut self, path: &Path, dtype: DType) -> Result<()> {
        let vae = SeparateVae::open(path, &self.vae, dtype)?;
        if vae.config.latent_channels != self.vae.latent_channels {
            bail!(
                "--vae {}: its {} latent channels do not fit this model's {}",
                path.display(),
                vae.config.latent_channels,
                self.vae.latent_channels
            );
        }
        self.vae = vae.config.clone();
        self.separate_vae = Some(Arc::new(vae));
        Ok(())
    }
}

impl ModelConfigs {
    /// Reads the scheduler, UNet, VAE and text-encoder configs of `files`' model.
    /// The configs of a single-file checkpoint (synthesised, or from `--config`).
    pub fn from_single_file(single: &SingleFile) -> Result<Self> {
        let configs = &single.configs;
        let what = |part: &str| format!("{} ({part} config {})", single.path.display(), configs.source);
        let scheduler: SchedulerConfig =
            serde_json::from_value(configs.scheduler.clone()).with_context(|| what("scheduler"))?;
        let unet = serde_json::from_value::<UNetConfig>(configs.unet.clone())
            .map_err(anyhow::Error::from)
            .and_then(|c| c.resolve())
            .with_context(|| format!("{}; {CONFIG_HINT}", what("UNet")))?;
        let vae: VaeConfig = serde_json::from_value(configs.vae.clone()).with_context(|| what("VAE"))?;
        vae.validate().with_context(|| what("VAE"))?;
        let text_encoder: ClipTextConfig =
            serde_json::from_value(configs.text_encoder.clone()).with_context(|| what("text encoder"))?;
        text_encoder
            .validate()
            .with_context(|| format!("{}; {CONFIG_HINT}", what("text encoder")))?;
        let text_encoder_2 = if configs.text_encoder_2.is_null() {
            None
        } else {
            let config: ClipTextConfig =
                serde_json::from_value(configs.text_encoder_2.clone()).with_context(|| what("text_encoder_2"))?;
            config
                .validate()
                .with_context(|| format!("{}; {CONFIG_HINT}", what("text_encoder_2")))?;
            Some(config)
        };
        let configs = Self {
            scheduler,
            scheduler_path: format!("{} ({})", single.path.display(), configs.source),
            unet,
            vae,
            text_encoder,
            text_encoder_2,
            // What A1111 and ComfyUI do with an empty SDXL negative prompt, and diffusers' default.
            force_zeros_for_empty_prompt: true,
            separate_vae: None,
        };
        configs
            .check_text_widths(&format!("{} ({})", single.path.display(), single.configs.source))
            .with_context(|| CONFIG_HINT)?;
        Ok(configs)
    }

    pub fn read(files: &ModelFiles) -> Result<Self> {
        let scheduler = read_scheduler_config(files)?;
        let scheduler_path = format!("{}/{SCHEDULER_CONFIG}", files.location());
        if scheduler.thresholding {
            bail!("{scheduler_path}: thresholding is not supported");
        }
        let unet_path = files.get(UNET_CONFIG)?;
        let unet = read_json::<UNetConfig>(&unet_path)?
            .resolve()
            .with_context(|| format!("{}", unet_path.display()))?;
        let vae_path = files.get(VAE_CONFIG)?;
        let vae: VaeConfig = read_json(&vae_path)?;
        vae.validate().with_context(|| format!("{}", vae_path.display()))?;
        let text_config = |name: &str| -> Result<ClipTextConfig> {
            let path = files.get(name)?;
            let config: ClipTextConfig = read_json(&path)?;
            config.validate().with_context(|| format!("{}", path.display()))?;
            Ok(config)
        };
        let text_encoder = text_config(TEXT_ENCODER_CONFIG)?;
        // model_index.json names the components (a hub repo's cache holds it, so no listing is
        // needed); a folder without one is looked into.
        let index: Option<ModelIndex> = if files.has(MODEL_INDEX)? {
            Some(read_json(&files.get(MODEL_INDEX)?)?)
        } else {
            None
        };
        let has_second = match &index {
            Some(index) => index
                .text_encoder_2
                .as_ref()
                .is_some_and(|v| v.as_array().is_some_and(|parts| parts.iter().any(|p| !p.is_null()))),
            None => files.has(TEXT_ENCODER_2_CONFIG)?,
        };
        let text_encoder_2 = if has_second {
            Some(text_config(TEXT_ENCODER_2_CONFIG)?)
        } else {
            None
        };
        let index = index.unwrap_or_default();
        let configs = Self {
            scheduler,
            scheduler_path,
            unet,
            vae,
            text_encoder,
            text_encoder_2,
            force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt.unwrap_or(true),
            separate_vae: None,
        };
        configs.check_text_widths(&files.location().to_string())?;
        Ok(configs)
    }

    /// The UNet's cross-attention and SDXL's pooled width against what the text encoders give.
    pub fn check_text_widths(&self, location: &str) -> Result<()> {
        let context = self.text_encoder.hidden_size + self.text_encoder_2.as_ref().map_or(0, |c| c.hidden_size);
        let cross = self.unet.mid_transformer.cross_attention_dim;
        if context != cross {
            bail!(
                "{location}: the text encoders give {context} channels but the UNet's cross_attention_dim is {cross}"
            );
        }
        match (&self.unet.text_time, &self.text_encoder_2) {
            (Some(text_time), Some(second)) => {
                let pooled = second.projection_dim.unwrap_or(second.hidden_size);
                if !second.with_projection() || pooled != text_time.pooled_dim() {
                    bail!(
                        "{location}: the UNet expects a pooled text embedding of {} (projection_class_embeddings_input_dim - 6 x addition_time_embed_dim) but text_encoder_2 gives {pooled}{}",
                        text_time.pooled_dim(),
                        if second.with_projection() { "" } else { " without a projection (not CLIPTextModelWithProjection)" }
                    );
                }
            }
            (Some(_), None) => bail!(
                "{location}: the UNet is SDXL's (addition_embed_type \"text_time\") but there is no text_encoder_2 (an SDXL refiner, which needs only text_encoder_2, is not supported)"
            ),
            (None, Some(_)) => bail!("{location}: text_encoder_2 is present but the UNet takes no pooled embedding"),
            (None, None) => {}
        }
        Ok(())
    }
}

/// A model's scheduler config alone: cheap, for `sdfix schedule`.
pub fn read_scheduler_config(files: &ModelFiles) -> Result<SchedulerConfig> {
    SchedulerConfig::from_file(&files.get(SCHEDULER_CONFIG)?)
}

/// Where a model's configs and weights come from: a diffusers layout (folder, hub repo, demo) or a
/// single-file checkpoint.
pub enum ModelSource {
    Layout(ModelFiles),
    Single(Box<SingleFile>),
}

impl ModelSource {
    /// Opens `location`; `options` apply to single files (`--config`, `--ema`, the prediction
    /// flags), and are refused for the other kinds when they would be ignored.
    pub fn open(location: ModelLocation, options: &SingleFileOptions) -> Result<Self> {
        match location {
            ModelLocation::File(path) => Ok(Self::Single(Box::new(SingleFile::open(&path, options)?))),
            location => {
                if let Some(dir) = &options.config_dir {
                    bail!(
                        "--config {} applies to single-file checkpoints, but --model {location} is a diffusers model",
                        dir.display()
                    );
                }
                if options.ema {
                    bail!("--ema applies to single-file checkpoints, but --model {location} is a diffusers model");
                }
                Ok(Self::Layout(ModelFiles::new(location)?))
            }
        }
    }

    /// The model's configs, read (or synthesised) and validated.
    pub fn configs(&self) -> Result<ModelConfigs> {
        match self {
            Self::Layout(files) => ModelConfigs::read(files),
            Self::Single(single) => ModelConfigs::from_single_file(single),
        }
    }

    /// What to print once the model is open (a single file's family and detection).
    pub fn describe(&self) -> Vec<String> {
        match self {
            Self::Layout(_) => Vec::new(),
            Self::Single(single) => single.describe(),
        }
    }

    /// What the model predicts and whether it was trained with zero terminal SNR, with where each
    /// came from: a single file's [`Detection`]; for a diffusers layout, `scheduler`'s
    /// `prediction_type` and `rescale_betas_zero_snr`, or diffusers' defaults (epsilon, no zero
    /// SNR) where the file lacks the key, which the report must not pass off as the model's word.
    pub fn detection(&self, scheduler: &SchedulerConfig) -> Result<Detection> {
        match self {
            Self::Single(single) => Ok(single.detection.clone()),
            Self::Layout(files) => {
                let keys: serde_json::Map<String, serde_json::Value> = read_json(&files.get(SCHEDULER_CONFIG)?)?;
                let source = |key: &str| {
                    if keys.contains_key(key) {
                        format!("{SCHEDULER_CONFIG} ({key})")
                    } else {
                        format!("diffusers' default ({SCHEDULER_CONFIG} has no {key})")
                    }
                };
                Ok(Detection {
                    prediction: scheduler.prediction_type.clone(),
                    zero_snr: scheduler.rescale_betas_zero_snr,
                    prediction_source: source("prediction_type"),
                    zero_snr_source: source("rescale_betas_zero_snr"),
                })
            }
        }
    }

    /// Keys of a single file that nothing read and no rule ignores (printed with `-v`).
    pub fn leftover_keys(&self) -> &[String] {
        match self {
            Self::Layout(_) => &[],
            Self::Single(single) => &single.leftover,
        }
    }

    /// One component's tensors (`unet`, `vae`, `text_encoder`) as a backend, with their names and
    /// a label for messages; nothing is read but a file's header.
    fn backend(&self, component: &str, dtype: DType) -> Result<(Box<dyn SimpleBackend>, BTreeSet<String>, String)> {
        Ok(match self {
            Self::Layout(files) => {
                let path = first_weight_file(files, &weight_candidates(component, weight_stem(component), dtype))?;
                let (backend, names) = open_backend(&path)?;
                (backend, names, path.display().to_string())
            }
            Self::Single(single) => {
                let map = match component {
                    "unet" => &single.unet,
                    "vae" => &single.vae,
                    "text_encoder" => &single.text_encoder,
                    "text_encoder_2" => single.text_encoder_2.as_ref().with_context(|| {
                        format!(
                            "{}: an {} checkpoint has no text_encoder_2",
                            single.path.display(),
                            single.family.name()
                        )
                    })?,
                    other => bail!("{}: single files have no {other}", single.path.display()),
                };
                let (backend, names) = single.backend(map)?;
                (backend, names, format!("{} ({component})", single.path.display()))
            }
        })
    }

    /// The names of the tensors a component loads from at `dtype` (what LoRA modules must
    /// match), read from headers only.
    pub fn tensor_names(&self, component: &str, dtype: DType) -> Result<BTreeSet<String>> {
        Ok(self.backend(component, dtype)?.1)
    }

    /// One component's weights, with the LoRA updates for it.
    fn weights(&self, component: &str, dtype: DType, device: &Device, loras: &Loras) -> Result<Weights> {
        let (backend, names, label) = self.backend(component, dtype)?;
        let backend = match component {
            "unet" => loras.patch(LoraComponent::Unet, backend, &names)?,
            "text_encoder" => loras.patch(LoraComponent::TextEncoder, backend, &names)?,
            "text_encoder_2" => loras.patch(LoraComponent::TextEncoder2, backend, &names)?,
            _ => backend,
        };
        Ok(Weights::from_backend(backend, names, label, dtype, device))
    }

    /// The model's CLIP tokenizer (a single file's: `--config`'s, else the built-in one of its
    /// family); `sdfix prompt` needs nothing else.
    pub fn tokenizer(&self) -> Result<ClipTokenizer> {
        match self {
            Self::Layout(files) => load_tokenizer(files, "tokenizer"),
            Self::Single(single) => ClipTokenizer::from_folder(&single.tokenizer_folder()?),
        }
    }

    /// SDXL's second tokenizer (OpenCLIP's, which pads with "!").
    fn tokenizer_2(&self) -> Result<ClipTokenizer> {
        match self {
            Self::Layout(files) => load_tokenizer(files, "tokenizer_2"),
            Self::Single(single) => ClipTokenizer::from_folder(&single.tokenizer_2_folder()?),
        }
    }
}

/// The tokenizer and the CLIP text encoder of a model, with its LoRA updates.
pub fn load_model_text_encoder(
    source: &ModelSource,
    configs: &ModelConfigs,
    dtype: DType,
    device: &Device,
    loras: &Loras,
) -> Result<TextEncoder> {
    let tokenizer = source.tokenizer()?;
    let model = source
        .weights("text_encoder", dtype, device, loras)?
        .build(|vb| ClipTextTransformer::new(vb, &configs.text_encoder))?;
    let encoder = TextEncoder::new(tokenizer, model, device);
    let Some(config) = &configs.text_encoder_2 else {
        return Ok(encoder);
    };
    let tokenizer = source.tokenizer_2()?;
    let model = source
        .weights("text_encoder_2", dtype, device, loras)?
        .build(|vb| ClipTextTransformer::new(vb, config))?;
    Ok(encoder.with_second(ClipEncoder { tokenizer, model }))
}

/// The UNet (with its LoRA updates) and the VAE decoder of a model; the VAE in f32 when its
/// config says `force_upcast` and the model runs in f16, bf16 under `SDFIX_CUDA_VAE_BF16`
/// ([`Vae::decode_dtype_on`]).
pub fn load_model_denoiser(
    source: &ModelSource,
    configs: &ModelConfigs,
    dtype: DType,
    device: &Device,
    loras: &Loras,
) -> Result<StableDiffusion> {
    let unet = load_model_unet(source, configs, dtype, device, loras)?;
    let vae_dtype = Vae::decode_dtype_on(&configs.vae, dtype, device);
    let vae = vae_weights(source, configs, vae_dtype, device)?
        .build_part(Vae::UNREAD_PREFIXES, |vb| Ok(Vae::new(vb, &configs.vae)?))?;
    Ok(StableDiffusion::new(unet, vae, dtype, vae_dtype, device))
}

/// The VAE's weights: `--vae`'s when given, else the model's.
fn vae_weights(source: &ModelSource, configs: &ModelConfigs, dtype: DType, device: &Device) -> Result<Weights> {
    match &configs.separate_vae {
        Some(vae) => {
            let (backend, names, label) = vae.backend()?;
            Ok(Weights::from_backend(backend, names, label, dtype, device))
        }
        None => source.weights("vae", dtype, device, &Loras::default()),
    }
}

/// The UNet of a model with its LoRA updates (to swap a loaded one for another LoRA set).
pub fn load_model_unet(
    source: &ModelSource,
    configs: &ModelConfigs,
    dtype: DType,
    device: &Device,
    loras: &Loras,
) -> Result<UNet2DConditionModel> {
    source
        .weights("unet", dtype, device, loras)?
        .build(|vb| Ok(UNet2DConditionModel::new(vb, &configs.unet)?))
}

/// The VAE encoder of a model (for img2img and inpainting), in the VAE's decode dtype: f32 under
/// f16 with `force_upcast`, as diffusers' img2img pipelines upcast the VAE to encode too.
pub fn load_model_vae_encoder(
    source: &ModelSource,
    configs: &ModelConfigs,
    dtype: DType,
    device: &Device,
) -> Result<VaeEncoder> {
    // The decoder's dtype (bf16 under lever 6 too): img2img hands the encoder pictures in it.
    let vae_dtype = Vae::decode_dtype_on(&configs.vae, dtype, device);
    let weights = vae_weights(source, configs, vae_dtype, device)?;
    weights
        .build_part(VaeEncoder::UNREAD_PREFIXES, |vb| Ok(VaeEncoder::new(vb, &configs.vae)?))
        .with_context(|| {
            format!(
                "{}: the VAE encoder (needed by --init-image) could not be read; was the VAE saved without its encoder?",
                weights.label()
            )
        })
}

/// Builds the UNet from a resolved config and its weights file.
pub fn build_unet(spec: &UNetSpec, weights: &Path, dtype: DType, device: &Device) -> Result<UNet2DConditionModel> {
    Weights::open(weights, dtype, device)?.build(|vb| Ok(UNet2DConditionModel::new(vb, spec)?))
}

/// Builds the CLIP text transformer from a validated config and its weights file.
pub fn build_text_encoder(
    config: &ClipTextConfig,
    weights: &Path,
    dtype: DType,
    device: &Device,
) -> Result<ClipTextTransformer> {
    Weights::open(weights, dtype, device)?.build(|vb| ClipTextTransformer::new(vb, config))
}

/// The VAE decoder from a validated config and its weights file; the encoder's tensors are
/// deliberately not read ([`Vae::UNREAD_PREFIXES`]).
pub fn build_vae(config: &VaeConfig, weights: &Path, dtype: DType, device: &Device) -> Result<Vae> {
    Weights::open(weights, dtype, device)?.build_part(Vae::UNREAD_PREFIXES, |vb| Ok(Vae::new(vb, config)?))
}

/// The VAE encoder from a validated config and its weights file; the decoder's tensors are not
/// read ([`VaeEncoder::UNREAD_PREFIXES`]). A VAE saved without its encoder is an error that says so.
pub fn build_vae_encoder(config: &VaeConfig, weights: &Path, dtype: DType, device: &Device) -> Result<VaeEncoder> {
    Weights::open(weights, dtype, device)?
        .build_part(VaeEncoder::UNREAD_PREFIXES, |vb| Ok(VaeEncoder::new(vb, config)?))
        .with_context(|| {
            format!(
                "{}: the VAE encoder (needed by --init-image) could not be read; was the VAE saved without its encoder?",
                weights.display()
            )
        })
}

/// Builds the VAE encoder from its config.json and weights file.
pub fn load_vae_encoder(config: &Path, weights: &Path, dtype: DType, device: &Device) -> Result<VaeEncoder> {
    let config_values: VaeConfig = read_json(config)?;
    config_values
        .validate()
        .with_context(|| format!("{}", config.display()))?;
    build_vae_encoder(&config_values, weights, dtype, device)
}

/// Builds the UNet from its config.json and weights file (one component, outside a model folder).
pub fn load_unet(config: &Path, weights: &Path, dtype: DType, device: &Device) -> Result<UNet2DConditionModel> {
    let spec = read_json::<UNetConfig>(config)?
        .resolve()
        .with_context(|| format!("{}", config.display()))?;
    build_unet(&spec, weights, dtype, device)
}

/// Builds the CLIP text transformer from its config.json and weights file.
pub fn load_text_encoder(config: &Path, weights: &Path, dtype: DType, device: &Device) -> Result<ClipTextTransformer> {
    let config_values: ClipTextConfig = read_json(config)?;
    config_values
        .validate()
        .with_context(|| format!("{}", config.display()))?;
    build_text_encoder(&config_values, weights, dtype, device)
}

/// Builds the VAE decoder from its config.json and weights file (the encoder's tensors are not
/// read).
pub fn load_vae(config: &Path, weights: &Path, dtype: DType, device: &Device) -> Result<Vae> {
    let config_values: VaeConfig = read_json(config)?;
    config_values
        .validate()
        .with_context(|| format!("{}", config.display()))?;
    build_vae(&config_values, weights, dtype, device)
}

/// The tokenizer files that [`load_tokenizer`] reads when present (fine-tuning copies them).
pub const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer/tokenizer.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
];

/// The tokenizer folder: `tokenizer.json`, or `vocab.json` + `merges.txt`, with the optional
/// special-token files fetched beside them.
/// `folder` is `tokenizer` or SDXL's `tokenizer_2`.
pub fn load_tokenizer(files: &ModelFiles, folder: &str) -> Result<ClipTokenizer> {
    let main = files.first_present(&[format!("{folder}/tokenizer.json"), format!("{folder}/vocab.json")])?;
    for optional in ["merges.txt", "special_tokens_map.json", "tokenizer_config.json"] {
        let optional = format!("{folder}/{optional}");
        if files.has(&optional)? {
            files.get(&optional)?;
        }
    }
    let folder: PathBuf = main.parent().context("tokenizer file has no folder")?.to_path_buf();
    ClipTokenizer::from_folder(&folder)
}
