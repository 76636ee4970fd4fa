//! The fine-tuning loop: networks built from trainable weights, seeded batches, gradient
//! accumulation and clipping, AdamW with warm-up then a constant learning rate, the EMA,
//! `train_log.jsonl`, checkpoints and `--resume`.
//!
//! Every random draw of optimizer step `s`, micro-batch `k` (example indices, timesteps, caption
//! dropout, noise) comes from ChaCha8 seeded by `--seed` on stream `s * grad_accum + k`, so a
//! resumed run draws exactly what the uninterrupted one would have.

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use super::adamw::{clip_grad_norm, AdamW, AdamWConfig};
use super::checkpoint::{self, StateTensors, TrainedWeights, TrainingState};
use super::data::{self, DataSource, LatentDataset};
use super::demo_data;
use super::ema::Ema;
use super::objective::{mse, TrainingSchedule};
use super::params::{save_safetensors, TrainableWeights};
use crate::engine::micro::{MicroConditioning, PixelSize};
use crate::model::clip::ClipTextTransformer;
use crate::model::stable_diffusion::{encode_prompts_with, ClipEncoder, PromptEncoding};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::{Conditioning, TextTime, UNet2DConditionModel};
use crate::weights::files::ModelFiles;
use crate::weights::loader::{self, component_weight_file, ModelConfigs, Weights};

/// The seed of the demo data set (`scripts/train_demo.py`'s `SEED`): the set does not change
/// with `--seed`.
const DEMO_DATA_SEED: u64 = 2024;
/// Steps the running-mean loss averages over.
const LOSS_WINDOW: usize = 50;
pub const TRAIN_LOG: &str = "train_log.jsonl";
const LATENT_CACHE: &str = "latents.safetensors";
const LATENT_CACHE_INFO: &str = "latents.json";
const UNET_PREFIX: &str = "unet/";
const TEXT_PREFIX: &str = "text_encoder/";

/// Everything a fine-tuning run is told.
#[derive(Debug, Clone)]
pub struct FinetuneSpec {
    pub data: DataSource,
    pub out: PathBuf,
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup_steps: usize,
    pub grad_accum: usize,
    pub ema_decay: Option<f64>,
    pub seed: u64,
    /// Image side; `None`: the demo's 32 for `--data demo`, else the UNet's sample size times the
    /// VAE factor.
    pub size: Option<usize>,
    pub train_text_encoder: bool,
    pub resume: bool,
    pub save_every: Option<usize>,
    pub max_grad_norm: Option<f64>,
    /// Share of captions replaced by "" (so classifier-free guidance keeps an unconditional model).
    pub caption_dropout: f64,
    pub adamw: AdamWConfig,
}

impl FinetuneSpec {
    /// Settings whose change would make `--resume` continue a different run.
    fn fingerprint(&self) -> String {
        format!(
            "data={} batch={} lr={} warmup={} accum={} ema={:?} seed={} size={:?} text={} clip={:?} dropout={} adamw={:?}",
            self.data.describe(),
            self.batch_size,
            self.lr,
            self.warmup_steps,
            self.grad_accum,
            self.ema_decay,
            self.seed,
            self.size,
            self.train_text_encoder,
            self.max_grad_norm,
            self.caption_dropout,
            self.adamw
        )
    }

    /// The learning rate of optimizer step `step` (0-based): linear warm-up to `lr` over
    /// `warmup_steps`, then constant. Unlike diffusers' `get_constant_schedule_with_warmup`, the
    /// first step does not get a zero rate.
    pub fn lr_at(&self, step: usize) -> f64 {
        if self.warmup_steps == 0 {
            self.lr
        } else {
            self.lr * ((step + 1) as f64 / self.warmup_steps as f64).min(1.0)
        }
    }
}

/// One micro-batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// x0, (b, c, h, w), on the training device.
    pub latents: Tensor,
    /// eps, shaped like the latents.
    pub noise: Tensor,
    pub timesteps: Vec<usize>,
    pub captions: Vec<String>,
}

/// The text side: trained (built from `Var`s) or frozen (fast path, embeddings cached).
enum TextSide {
    Trained(TrainableWeights),
    Frozen(std::cell::RefCell<HashMap<String, PromptEncoding>>),
}

/// The networks being trained and the schedule they are trained on.
pub struct Networks {
    pub unet_weights: TrainableWeights,
    pub unet: UNet2DConditionModel,
    text: TextSide,
    pub text_encoder: ClipTextTransformer,
    pub tokenizer: ClipTokenizer,
    /// SDXL's second text encoder (always frozen).
    second: Option<ClipEncoder>,
    /// The VAE's downscale factor: SDXL's micro-conditioning is in pixels.
    vae_factor: usize,
    pub schedule: TrainingSchedule,
    device: Device,
}

impl Networks {
    /// Loads the UNet (trainable) and the text encoder (trainable when `train_text_encoder`) of
    /// `files`' model in f32 on `device`.
    pub fn load(files: &ModelFiles, configs: &ModelConfigs, train_text_encoder: bool, device: &Device) -> Result<Self> {
        let unet_file = component_weight_file(files, "unet", DType::F32)?;
        let unet_weights = TrainableWeights::load(&unet_file, device)?;
        let unet = Weights::from_tensors(
            unet_weights.tensors(),
            &unet_file.display().to_string(),
            DType::F32,
            device,
        )
        .build(|vb| Ok(UNet2DConditionModel::new(vb, &configs.unet)?))?;
        let text_file = component_weight_file(files, "text_encoder", DType::F32)?;
        let second = match &configs.text_encoder_2 {
            Some(_) if train_text_encoder => bail!(
                "--train-text-encoder is not supported for SDXL: its two text encoders stay frozen (as diffusers' train_text_to_image_sdxl.py keeps them)"
            ),
            Some(config) => {
                let file = component_weight_file(files, "text_encoder_2", DType::F32)?;
                Some(ClipEncoder {
                    tokenizer: loader::load_tokenizer(files, "tokenizer_2")?,
                    model: loader::build_text_encoder(config, &file, DType::F32, device)?,
                })
            }
            None => None,
        };
        let (text, text_encoder) = if train_text_encoder {
            let weights = TrainableWeights::load(&text_file, device)?;
            let model = Weights::from_tensors(weights.tensors(), &text_file.display().to_string(), DType::F32, device)
                .build(|vb| ClipTextTransformer::new(vb, &configs.text_encoder))?;
            (TextSide::Trained(weights), model)
        } else {
            let model = loader::build_text_encoder(&configs.text_encoder, &text_file, DType::F32, device)?;
            (TextSide::Frozen(Default::default()), model)
        };
        Ok(Self {
            unet_weights,
            unet,
            text,
            text_encoder,
            tokenizer: loader::load_tokenizer(files, "tokenizer")?,
            second,
            vae_factor: configs.vae.downscale_factor(),
            schedule: TrainingSchedule::from_config(&configs.scheduler)?,
            device: device.clone(),
        })
    }

    /// The trainable parameters, UNet first, and their names (`unet/...`, `text_encoder/...`).
    pub fn params(&self) -> (Vec<String>, Vec<Var>) {
        let mut names: Vec<String> = self
            .unet_weights
            .names
            .iter()
            .map(|n| format!("{UNET_PREFIX}{n}"))
            .collect();
        let mut vars = self.unet_weights.vars.clone();
        if let TextSide::Trained(weights) = &self.text {
            names.extend(weights.names.iter().map(|n| format!("{TEXT_PREFIX}{n}")));
            vars.extend(weights.vars.iter().cloned());
        }
        (names, vars)
    }

    fn encode_ids(&self, captions: &[String]) -> Result<Tensor> {
        let mut ids = Vec::with_capacity(captions.len() * self.tokenizer.max_length());
        for caption in captions {
            ids.extend(self.tokenizer.encode(caption)?);
        }
        Ok(Tensor::from_vec(
            ids,
            (captions.len(), self.tokenizer.max_length()),
            &self.device,
        )?)
    }

    /// The text context of `captions`, (b, tokens, dim), and SDXL's pooled embeddings.
    pub fn context(&self, captions: &[String]) -> Result<PromptEncoding> {
        match &self.text {
            TextSide::Trained(_) => Ok(PromptEncoding {
                context: self.text_encoder.forward(&self.encode_ids(captions)?)?,
                pooled: None,
            }),
            TextSide::Frozen(cache) => {
                let mut rows = Vec::with_capacity(captions.len());
                for caption in captions {
                    let cached = cache.borrow().get(caption).cloned();
                    let row = match cached {
                        Some(row) => row,
                        None => {
                            let row = encode_prompts_with(
                                &self.tokenizer,
                                &self.text_encoder,
                                self.second.as_ref(),
                                &[caption.as_str()],
                                &self.device,
                            )?;
                            cache.borrow_mut().insert(caption.clone(), row.clone());
                            row
                        }
                    };
                    rows.push(row);
                }
                let context = Tensor::cat(&rows.iter().map(|r| &r.context).collect::<Vec<_>>(), 0)?;
                let pooled = match rows.iter().map(|r| r.pooled.as_ref()).collect::<Option<Vec<_>>>() {
                    Some(pooled) if !pooled.is_empty() => Some(Tensor::cat(&pooled, 0)?),
                    _ => None,
                };
                Ok(PromptEncoding { context, pooled })
            }
        }
    }

    /// The UNet's conditioning for a micro-batch: SDXL's adds the pooled embeddings and the
    /// micro-conditioning of uncropped pictures of the latents' size (what diffusers'
    /// train_text_to_image_sdxl.py computes for images it neither resizes nor crops).
    fn conditioning(&self, captions: &[String], latents: &Tensor) -> Result<Conditioning> {
        let encoded = self.context(captions)?;
        let text_time = match encoded.pooled {
            Some(text_embeds) => {
                let (b, _, h, w) = latents.dims4()?;
                let size = PixelSize {
                    width: w * self.vae_factor,
                    height: h * self.vae_factor,
                };
                Some(TextTime {
                    text_embeds,
                    time_ids: vec![MicroConditioning::default().time_ids(size).0; b],
                })
            }
            None => None,
        };
        Ok(Conditioning {
            context: encoded.context,
            text_time,
        })
    }

    /// The v-prediction loss of one micro-batch (a scalar that carries the gradient graph).
    pub fn loss(&self, batch: &Batch) -> Result<Tensor> {
        let conditioning = self.conditioning(&batch.captions, &batch.latents)?;
        let (noisy, target) = self
            .schedule
            .noisy_and_target(&batch.latents, &batch.noise, &batch.timesteps)?;
        let timesteps: Vec<f64> = batch.timesteps.iter().map(|&t| t as f64).collect();
        let prediction = self.unet.forward_timesteps(&noisy, &timesteps, &conditioning)?;
        mse(&prediction, &target)
    }

    /// The weights to save: `values` (one per parameter, in [`Self::params`] order) under their
    /// file names.
    pub fn trained_weights(&self, values: &[Tensor]) -> TrainedWeights {
        let unet_count = self.unet_weights.vars.len();
        TrainedWeights {
            unet: self.unet_weights.named(&values[..unet_count]),
            text_encoder: match &self.text {
                TextSide::Trained(weights) => Some(weights.named(&values[unet_count..])),
                TextSide::Frozen(_) => None,
            },
        }
    }
}

/// Gradients of `loss` for `params` (None where a parameter did not take part), detached:
/// candle leaves a leaf's gradient linked to the forward graph (`grad * activation`), and
/// keeping it in the optimizer's moments would keep every step's activations alive.
pub fn gradients(loss: &Tensor, params: &[Var]) -> Result<Vec<Option<Tensor>>> {
    let store = loss.backward()?;
    Ok(params
        .iter()
        .map(|p| store.get(p.as_tensor()).map(Tensor::detach))
        .collect())
}

/// What the loop reports.
#[derive(Debug, Clone)]
pub enum TrainEvent {
    /// A line for the person watching.
    Info(String),
    /// Latents encoded so far, of a total.
    Encoding {
        done: usize,
        total: usize,
    },
    /// Optimizer step `step` (1-based) done.
    Step {
        step: usize,
        steps: usize,
        loss: f64,
        running_loss: f64,
        lr: f64,
    },
    Saved(PathBuf),
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    /// Stopped by the flag (Ctrl-C) after saving a checkpoint at this step.
    Interrupted(usize),
}

/// A run: its spec, model, data, optimizer and position.
pub struct Trainer {
    pub spec: FinetuneSpec,
    files: ModelFiles,
    pub nets: Networks,
    pub data: LatentDataset,
    names: Vec<String>,
    params: Vec<Var>,
    optimizer: AdamW,
    ema: Option<Ema>,
    /// Optimizer steps done.
    pub step: usize,
}

impl Trainer {
    /// Loads the model, prepares (or reads the cached) latents, and with `--resume` restores the
    /// latest checkpoint.
    pub fn new(
        spec: FinetuneSpec,
        files: ModelFiles,
        configs: &ModelConfigs,
        device: &Device,
        observer: &mut dyn FnMut(TrainEvent),
    ) -> Result<Self> {
        ensure!(
            spec.batch_size > 0 && spec.grad_accum > 0,
            "batch size and --grad-accum must be at least 1"
        );
        ensure!(
            (0.0..1.0).contains(&spec.caption_dropout),
            "caption dropout must lie in [0, 1)"
        );
        if let Some(decay) = spec.ema_decay {
            ensure!(
                (0.0..1.0).contains(&decay),
                "--ema {decay}: the decay must lie in [0, 1), e.g. 0.999"
            );
        }
        let existing = checkpoint::latest_checkpoint(&spec.out)?;
        if !spec.resume && (existing.is_some() || spec.out.join(TRAIN_LOG).exists()) {
            bail!(
                "{} already holds a fine-tuning run; pass --resume to continue it, or choose another --out",
                spec.out.display()
            );
        }
        if spec.resume && existing.is_none() {
            bail!(
                "--resume: no checkpoint in {}/{}; drop --resume to start afresh",
                spec.out.display(),
                checkpoint::CHECKPOINTS_DIR
            );
        }
        fs::create_dir_all(&spec.out).with_context(|| format!("creating {}", spec.out.display()))?;
        let nets = Networks::load(&files, configs, spec.train_text_encoder, device)?;
        let data = prepare_data(&spec, &files, configs, device, observer)?;
        let (names, params) = nets.params();
        let optimizer = AdamW::new(&params, spec.adamw)?;
        let ema = spec.ema_decay.map(|d| Ema::new(&params, d)).transpose()?;
        let mut trainer = Self {
            spec,
            files,
            nets,
            data,
            names,
            params,
            optimizer,
            ema,
            step: 0,
        };
        if let Some(dir) = existing {
            trainer.restore(&dir, device)?;
            observer(TrainEvent::Info(format!(
                "resumed from {} (step {})",
                dir.display(),
                trainer.step
            )));
        }
        Ok(trainer)
    }

    fn restore(&mut self, dir: &Path, device: &Device) -> Result<()> {
        let (state, tensors) = checkpoint::load_checkpoint(dir, device)?;
        ensure!(
            state.names == self.names,
            "{}: the checkpoint trains other parameters (was --train-text-encoder changed?)",
            dir.display()
        );
        ensure!(
            state.settings == self.spec.fingerprint(),
            "{}: the checkpoint was made with other settings ({}); resume with the same flags",
            dir.display(),
            state.settings
        );
        for (name, var) in self.names.iter().zip(&self.params) {
            let value = tensors
                .weights
                .get(name)
                .with_context(|| format!("checkpoint lacks {name}"))?;
            var.set(value)?;
        }
        self.optimizer
            .load_state(&self.names, &tensors.optimizer, &state.optimizer_steps)?;
        if let (Some(ema), Some(saved)) = (&mut self.ema, &tensors.ema) {
            for (name, weight) in self.names.iter().zip(&mut ema.weights) {
                *weight = saved
                    .get(name)
                    .with_context(|| format!("EMA state lacks {name}"))?
                    .clone();
            }
        }
        self.step = state.step;
        truncate_log(&self.spec.out.join(TRAIN_LOG), state.step)?;
        Ok(())
    }

    /// The micro-batch of optimizer step `step`, micro-batch `micro`.
    pub fn batch(&self, step: usize, micro: usize) -> Result<Batch> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.spec.seed);
        rng.set_stream((step * self.spec.grad_accum + micro) as u64);
        let b = self.spec.batch_size;
        let indices: Vec<u32> = (0..b).map(|_| rng.random_range(0..self.data.len()) as u32).collect();
        let timesteps: Vec<usize> = (0..b)
            .map(|_| rng.random_range(0..self.nets.schedule.train_timesteps()))
            .collect();
        let captions: Vec<String> = indices
            .iter()
            .map(|&i| {
                let dropped = rng.random::<f64>() < self.spec.caption_dropout;
                if dropped {
                    String::new()
                } else {
                    self.data.captions[i as usize].clone()
                }
            })
            .collect();
        let index = Tensor::from_vec(indices, b, &Device::Cpu)?;
        let latents = self.data.latents.index_select(&index, 0)?;
        let noise: Vec<f32> = (0..latents.elem_count()).map(|_| rng.sample(StandardNormal)).collect();
        let device = &self.nets.device;
        Ok(Batch {
            noise: Tensor::from_vec(noise, latents.shape(), &Device::Cpu)?.to_device(device)?,
            latents: latents.to_device(device)?,
            timesteps,
            captions,
        })
    }

    /// Runs until `spec.steps` or until `stop` is set (then saves a checkpoint first).
    pub fn run(&mut self, stop: &AtomicBool, observer: &mut dyn FnMut(TrainEvent)) -> Result<Outcome> {
        let log_path = self.spec.out.join(TRAIN_LOG);
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let mut recent: VecDeque<f64> = VecDeque::with_capacity(LOSS_WINDOW);
        while self.step < self.spec.steps {
            if stop.load(Ordering::SeqCst) {
                let dir = self.save_checkpoint()?;
                observer(TrainEvent::Saved(dir));
                return Ok(Outcome::Interrupted(self.step));
            }
            let lr = self.spec.lr_at(self.step);
            let loss = self.train_step(lr)?;
            self.step += 1;
            if recent.len() == LOSS_WINDOW {
                recent.pop_front();
            }
            recent.push_back(loss);
            writeln!(log, "{{\"step\": {}, \"loss\": {loss}, \"lr\": {lr}}}", self.step)?;
            log.flush()?;
            observer(TrainEvent::Step {
                step: self.step,
                steps: self.spec.steps,
                loss,
                running_loss: recent.iter().sum::<f64>() / recent.len() as f64,
                lr,
            });
            let due = self.spec.save_every.is_some_and(|n| self.step.is_multiple_of(n));
            if due && self.step < self.spec.steps {
                observer(TrainEvent::Saved(self.save_checkpoint()?));
            }
        }
        observer(TrainEvent::Saved(self.save_checkpoint()?));
        self.save_model(&self.spec.out)?;
        observer(TrainEvent::Saved(self.spec.out.clone()));
        Ok(Outcome::Finished)
    }

    /// One optimizer step over `grad_accum` micro-batches; returns the mean loss.
    pub fn train_step(&mut self, lr: f64) -> Result<f64> {
        let accum = self.spec.grad_accum;
        let mut grads: Vec<Option<Tensor>> = vec![None; self.params.len()];
        let mut total = 0f64;
        for micro in 0..accum {
            let batch = self.batch(self.step, micro)?;
            let loss = self.nets.loss(&batch)?;
            total += loss.to_scalar::<f32>()? as f64;
            let scaled = (loss / accum as f64)?;
            for (sum, grad) in grads.iter_mut().zip(gradients(&scaled, &self.params)?) {
                *sum = match (sum.take(), grad) {
                    (Some(a), Some(b)) => Some((a + b)?),
                    (a, b) => a.or(b),
                };
            }
        }
        self.apply(&mut grads, lr)?;
        Ok(total / accum as f64)
    }

    /// Clips `grads`, takes the AdamW step and updates the EMA.
    pub fn apply(&mut self, grads: &mut [Option<Tensor>], lr: f64) -> Result<()> {
        if let Some(max_norm) = self.spec.max_grad_norm {
            clip_grad_norm(grads, max_norm)?;
        }
        self.optimizer.step(&self.params, grads, lr)?;
        if let Some(ema) = &mut self.ema {
            ema.update(&self.params, self.step)?;
        }
        Ok(())
    }

    /// The parameters (names, vars), in optimizer order.
    pub fn params(&self) -> (&[String], &[Var]) {
        (&self.names, &self.params)
    }

    /// The weights a saved model gets: the EMA when there is one, else the live weights.
    fn export_values(&self) -> Vec<Tensor> {
        match &self.ema {
            Some(ema) => ema.weights.clone(),
            None => self.params.iter().map(|p| p.as_tensor().detach()).collect(),
        }
    }

    /// Writes the diffusers-layout model folder at `dir`.
    pub fn save_model(&self, dir: &Path) -> Result<()> {
        checkpoint::write_model_folder(dir, &self.files, &self.nets.trained_weights(&self.export_values()))
    }

    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let named =
            |values: Vec<Tensor>| -> HashMap<String, Tensor> { self.names.iter().cloned().zip(values).collect() };
        let (optimizer, optimizer_steps) = self.optimizer.state(&self.names);
        let tensors = StateTensors {
            weights: named(self.params.iter().map(|p| p.as_tensor().detach()).collect()),
            optimizer,
            ema: self.ema.as_ref().map(|e| named(e.weights.clone())),
        };
        let state = TrainingState {
            step: self.step,
            names: self.names.clone(),
            optimizer_steps,
            settings: self.spec.fingerprint(),
        };
        let model = self.nets.trained_weights(&self.export_values());
        checkpoint::save_checkpoint(&self.spec.out, &self.files, &model, &state, &tensors)
    }
}

/// Keeps the log lines of steps up to `step` (a resumed run rewrites what came after).
fn truncate_log(path: &Path, step: usize) -> Result<()> {
    if !path.is_file() {
        return Ok(());
    }
    let text = fs::read_to_string(path)?;
    let kept: String = text
        .lines()
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| s as usize <= step)
        })
        .map(|line| format!("{line}\n"))
        .collect();
    fs::write(path, kept)?;
    Ok(())
}

/// The latents and captions: from the cache in `--out` when it matches, else loaded, encoded and
/// cached.
fn prepare_data(
    spec: &FinetuneSpec,
    files: &ModelFiles,
    configs: &ModelConfigs,
    device: &Device,
    observer: &mut dyn FnMut(TrainEvent),
) -> Result<LatentDataset> {
    let factor = configs.vae.downscale_factor();
    let size = match (spec.size, &spec.data) {
        (Some(size), _) => size,
        (None, DataSource::Demo) => demo_data::DEMO_IMAGE_SIZE,
        (None, DataSource::Folder(_)) => configs.unet.sample_size.unwrap_or(64) * factor,
    };
    ensure!(
        size > 0 && size.is_multiple_of(factor),
        "--size {size} must be a positive multiple of the VAE factor {factor}"
    );
    if spec.data == DataSource::Demo && size != demo_data::DEMO_IMAGE_SIZE {
        bail!(
            "--data demo makes {0}x{0} images; drop --size",
            demo_data::DEMO_IMAGE_SIZE
        );
    }
    let key = format!("{} size={size}", spec.data.describe());
    let cache = spec.out.join(LATENT_CACHE);
    let info = spec.out.join(LATENT_CACHE_INFO);
    if cache.is_file() && info.is_file() {
        let saved: serde_json::Value = serde_json::from_str(&fs::read_to_string(&info)?)?;
        if saved.get("key").and_then(|k| k.as_str()) == Some(key.as_str()) {
            let captions: Vec<String> = serde_json::from_value(saved["captions"].clone())?;
            let latents = candle_core::safetensors::load(&cache, &Device::Cpu)?
                .remove("latents")
                .context("latent cache lacks 'latents'")?;
            observer(TrainEvent::Info(format!(
                "{} cached latents from {}",
                captions.len(),
                cache.display()
            )));
            return Ok(LatentDataset { latents, captions });
        }
    }
    let (pixels, captions) = match &spec.data {
        DataSource::Demo => demo_data::make_dataset(demo_data::DEMO_EXAMPLES, DEMO_DATA_SEED),
        DataSource::Folder(folder) => {
            let examples = data::folder_examples(folder)?;
            let mut pixels = Vec::with_capacity(examples.len() * 3 * size * size);
            let mut captions = Vec::with_capacity(examples.len());
            for (path, caption) in examples {
                pixels.extend(data::load_image(&path, size)?);
                captions.push(caption);
            }
            (pixels, captions)
        }
    };
    observer(TrainEvent::Info(format!(
        "encoding {} images of {size}x{size} with the VAE (once; cached in {})",
        captions.len(),
        cache.display()
    )));
    let vae_file = component_weight_file(files, "vae", DType::F32)?;
    let vae = loader::build_vae_encoder(&configs.vae, &vae_file, DType::F32, device)?;
    let total = captions.len();
    let latents = data::encode(&vae, &pixels, size, device, |done| {
        observer(TrainEvent::Encoding { done, total })
    })?;
    save_safetensors(&HashMap::from([("latents".to_string(), latents.clone())]), &cache)?;
    fs::write(
        &info,
        serde_json::to_string(&serde_json::json!({ "key": key, "captions": captions }))?,
    )?;
    Ok(LatentDataset { latents, captions })
}
