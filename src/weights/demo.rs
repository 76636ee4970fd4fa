//! The demo models, built into the binary: `demo` (trained with the paper's fixes: zero terminal
//! SNR, v-prediction) and `demo-flawed` (the same data and steps, trained the stock way: epsilon,
//! SNR(T) = 0.0047). Both are tiny SD-architecture models (32x32 images) made by
//! `scripts/train_demo.py`; they let `sdfix generate` run out of the box, offline, from any
//! folder, and show the paper's brightness effect.
//!
//! The files are embedded at compile time and written once to a cache folder
//! (`$SDFIX_CACHE`, else `$XDG_CACHE_HOME/sdfix`, else `~/.cache/sdfix`, else the temp dir), named
//! by a hash of their bytes computed at build time (`build.rs`); from there they load like any
//! diffusers-layout folder.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The names `--model` accepts for the built-in models.
pub const DEMO_MODELS: [&str; 2] = ["demo", "demo-flawed"];
/// What `--model` defaults to.
pub const DEFAULT_MODEL: &str = "demo";

struct EmbeddedFile {
    path: &'static str,
    bytes: &'static [u8],
}

macro_rules! embed {
    ($model:literal, $path:literal) => {
        EmbeddedFile {
            path: $path,
            bytes: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/models/", $model, "/", $path)),
        }
    };
}

/// The files of one model; the tokenizer is the same CLIP BPE for both, embedded once.
macro_rules! model_files {
    ($model:literal) => {
        &[
            embed!($model, "model_index.json"),
            embed!($model, "scheduler/scheduler_config.json"),
            embed!($model, "text_encoder/config.json"),
            embed!($model, "text_encoder/model.safetensors"),
            embed!("demo", "tokenizer/merges.txt"),
            embed!("demo", "tokenizer/special_tokens_map.json"),
            embed!("demo", "tokenizer/tokenizer_config.json"),
            embed!("demo", "tokenizer/vocab.json"),
            embed!($model, "unet/config.json"),
            embed!($model, "unet/diffusion_pytorch_model.safetensors"),
            embed!($model, "vae/config.json"),
            embed!($model, "vae/diffusion_pytorch_model.safetensors"),
        ]
    };
}

const DEMO: &[EmbeddedFile] = model_files!("demo");
const DEMO_FLAWED: &[EmbeddedFile] = model_files!("demo-flawed");

fn files_of(name: &str) -> Option<&'static [EmbeddedFile]> {
    match name {
        "demo" => Some(DEMO),
        "demo-flawed" => Some(DEMO_FLAWED),
        _ => None,
    }
}

/// A hash of the embedded files' content, computed by `build.rs` when they change: it names their
/// cache folders without the program reading its own embedded bytes (which would make them
/// resident on every run).
const EMBEDDED_HASH: &str = env!("SDFIX_EMBEDDED_HASH");

/// The sdfix cache folder: `$SDFIX_CACHE`, else `$XDG_CACHE_HOME/sdfix`, else `~/.cache/sdfix`,
/// else the temp dir.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("SDFIX_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("sdfix");
    }
    if let Some(home) = std::env::var_os("HOME") {
        return PathBuf::from(home).join(".cache").join("sdfix");
    }
    std::env::temp_dir().join("sdfix")
}

/// Writes `files` under `folder` through a temporary sibling folder and a rename, so a folder
/// that exists is always complete.
fn extract(files: &[EmbeddedFile], folder: &Path, marker: &str) -> Result<()> {
    let parent = folder.parent().context("cache folder has no parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let staging = parent.join(format!(
        ".{}.{}.tmp",
        folder.file_name().and_then(|n| n.to_str()).unwrap_or("demo"),
        std::process::id()
    ));
    for file in files {
        let path = staging.join(file.path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, file.bytes).with_context(|| format!("cannot write {}", path.display()))?;
    }
    match std::fs::rename(&staging, folder) {
        Ok(()) => Ok(()),
        // Another process extracted it first: theirs is complete; drop ours.
        Err(_) if folder.join(marker).is_file() => {
            let _ = std::fs::remove_dir_all(&staging);
            Ok(())
        }
        Err(err) => Err(err).with_context(|| format!("cannot create {}", folder.display())),
    }
}

/// The folder of built-in model `name`, extracting it on first use; `None` for other names.
pub fn folder(name: &str) -> Result<Option<PathBuf>> {
    let Some(files) = files_of(name) else { return Ok(None) };
    let folder = cache_root().join(format!("{name}-{EMBEDDED_HASH}"));
    if !folder.join("model_index.json").is_file() {
        extract(files, &folder, "model_index.json").with_context(|| {
            format!("cannot unpack the built-in model {name} (set SDFIX_CACHE to a writable folder)")
        })?;
    }
    Ok(Some(folder))
}

/// The CLIP tokenizer for single-file checkpoints, which carry none: the demo models' real CLIP
/// BPE files, with SD 2.x's padding (`!`, id 0) or SD 1.x's (`<|endoftext|>`, as
/// openai/clip-vit-large-patch14's tokenizer pads).
const CLIP_TOKENIZER_SD2: &[EmbeddedFile] = &[
    embed!("demo", "tokenizer/merges.txt"),
    embed!("demo", "tokenizer/special_tokens_map.json"),
    embed!("demo", "tokenizer/tokenizer_config.json"),
    embed!("demo", "tokenizer/vocab.json"),
];
const SD1_SPECIAL_TOKENS: &[u8] = br#"{"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}"#;
const SD1_TOKENIZER_CONFIG: &[u8] =
    br#"{"model_max_length": 77, "do_lower_case": true, "tokenizer_class": "CLIPTokenizer"}"#;
const CLIP_TOKENIZER_SD1: &[EmbeddedFile] = &[
    embed!("demo", "tokenizer/merges.txt"),
    EmbeddedFile {
        path: "tokenizer/special_tokens_map.json",
        bytes: SD1_SPECIAL_TOKENS,
    },
    EmbeddedFile {
        path: "tokenizer/tokenizer_config.json",
        bytes: SD1_TOKENIZER_CONFIG,
    },
    embed!("demo", "tokenizer/vocab.json"),
];

/// The built-in CLIP tokenizer folder, padding with EOS (SD 1.x) or with `!` (SD 2.x); unpacked
/// into the cache on first use, like the demo models.
pub fn clip_tokenizer_folder(pad_with_eos: bool) -> Result<PathBuf> {
    let (name, files) = if pad_with_eos {
        ("clip-tokenizer-sd1", CLIP_TOKENIZER_SD1)
    } else {
        ("clip-tokenizer-sd2", CLIP_TOKENIZER_SD2)
    };
    let folder = cache_root().join(format!("{name}-{EMBEDDED_HASH}"));
    if !folder.join("tokenizer/vocab.json").is_file() {
        extract(files, &folder, "tokenizer/vocab.json")
            .context("cannot unpack the built-in CLIP tokenizer (set SDFIX_CACHE to a writable folder)")?;
    }
    Ok(folder.join("tokenizer"))
}
