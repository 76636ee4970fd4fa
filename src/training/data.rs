//! Training data: a folder of images with same-named `.txt` captions, or with a `metadata.jsonl`
//! of `{"file_name": ..., "text": ...}` lines (Hugging Face's ImageFolder), or `demo`
//! ([`super::demo_data`]). Images are resized so the shorter side is `size` (bilinear) and
//! center-cropped to `size` x `size`, as diffusers' `train_text_to_image.py` does, then encoded
//! once by the VAE encoder: the latent distribution's mean times the scaling factor.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::model::vae::VaeEncoder;

/// The image extensions a data folder may hold.
const IMAGE_EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "webp", "bmp"];
/// Images per VAE-encoder call.
const ENCODE_CHUNK: usize = 64;

/// What `--data` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    Demo,
    Folder(PathBuf),
}

impl DataSource {
    pub fn parse(value: &str) -> Self {
        if value == "demo" {
            Self::Demo
        } else {
            Self::Folder(PathBuf::from(value))
        }
    }

    /// For the latent cache's key and messages.
    pub fn describe(&self) -> String {
        match self {
            Self::Demo => "demo".into(),
            Self::Folder(path) => path.display().to_string(),
        }
    }
}

/// Encoded training examples.
#[derive(Debug, Clone)]
pub struct LatentDataset {
    /// (n, c, h, w), f32, on the CPU.
    pub latents: Tensor,
    pub captions: Vec<String>,
}

impl LatentDataset {
    pub fn len(&self) -> usize {
        self.captions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.captions.is_empty()
    }
}

#[derive(Deserialize)]
struct MetadataLine {
    file_name: String,
    text: String,
}

/// (image path, caption) pairs of a folder, sorted by file name.
pub fn folder_examples(folder: &Path) -> Result<Vec<(PathBuf, String)>> {
    ensure!(
        folder.is_dir(),
        "--data {}: no such folder (or pass demo)",
        folder.display()
    );
    let metadata = folder.join("metadata.jsonl");
    let mut examples = Vec::new();
    if metadata.is_file() {
        let text = fs::read_to_string(&metadata).with_context(|| format!("reading {}", metadata.display()))?;
        for (number, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let entry: MetadataLine = serde_json::from_str(line).with_context(|| {
                format!(
                    "{} line {}: expected {{\"file_name\", \"text\"}}",
                    metadata.display(),
                    number + 1
                )
            })?;
            examples.push((folder.join(entry.file_name), entry.text));
        }
    } else {
        for entry in fs::read_dir(folder).with_context(|| format!("reading {}", folder.display()))? {
            let path = entry?.path();
            let is_image = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
            if !is_image {
                continue;
            }
            let caption_path = path.with_extension("txt");
            let caption = fs::read_to_string(&caption_path)
                .with_context(|| format!("{} has no caption file {}", path.display(), caption_path.display()))?;
            examples.push((path, caption.trim().to_string()));
        }
    }
    examples.sort_by(|a, b| a.0.cmp(&b.0));
    if examples.is_empty() {
        bail!(
            "--data {}: no images (expected images with same-named .txt captions, or a metadata.jsonl)",
            folder.display()
        );
    }
    Ok(examples)
}

/// An image file as (3, size, size) values in [-1, 1]: the shorter side resized to `size`, then
/// center-cropped.
pub fn load_image(path: &Path, size: usize) -> Result<Vec<f32>> {
    let image = image::open(path)
        .with_context(|| format!("reading {}", path.display()))?
        .to_rgb8();
    let (w, h) = image.dimensions();
    let scale = size as f64 / w.min(h) as f64;
    let (nw, nh) = (
        ((w as f64 * scale).round() as u32).max(size as u32),
        ((h as f64 * scale).round() as u32).max(size as u32),
    );
    let resized = image::imageops::resize(&image, nw, nh, image::imageops::FilterType::Triangle);
    let (left, top) = ((nw - size as u32) / 2, (nh - size as u32) / 2);
    let cropped = image::imageops::crop_imm(&resized, left, top, size as u32, size as u32).to_image();
    let mut values = vec![0f32; 3 * size * size];
    for (x, y, pixel) in cropped.enumerate_pixels() {
        for c in 0..3 {
            values[c * size * size + y as usize * size + x as usize] = pixel[c] as f32 / 127.5 - 1.0;
        }
    }
    Ok(values)
}

/// Encodes `pixels` ((n, 3, size, size) in [-1, 1], flat) with the VAE encoder (loaded in f32),
/// in chunks: (n, c, size / f, size / f) latents on the CPU; `on_chunk` hears the count done.
pub fn encode(
    vae: &VaeEncoder,
    pixels: &[f32],
    size: usize,
    device: &Device,
    mut on_chunk: impl FnMut(usize),
) -> Result<Tensor> {
    let per_image = 3 * size * size;
    let count = pixels.len() / per_image;
    let dtype = DType::F32;
    let mut chunks = Vec::new();
    for start in (0..count).step_by(ENCODE_CHUNK) {
        let n = ENCODE_CHUNK.min(count - start);
        let batch = Tensor::from_slice(
            &pixels[start * per_image..(start + n) * per_image],
            (n, 3, size, size),
            &Device::Cpu,
        )?
        .to_device(device)?
        .to_dtype(dtype)?;
        let latents = vae.encode(&batch)?.latents(None)?;
        chunks.push(latents.to_dtype(DType::F32)?.to_device(&Device::Cpu)?);
        on_chunk(start + n);
    }
    Ok(Tensor::cat(&chunks, 0)?)
}
