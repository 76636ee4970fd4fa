//! Writing images: predictable file names and atomic writes (a temporary name in the same
//! folder, then a rename), so a killed run never leaves a partial PNG behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Tensor;

use super::metadata::{PARAMETERS_CHUNK, SETTINGS_CHUNK};
use crate::engine::GeneratedImage;

/// The most prompt characters a file name keeps.
const SLUG_MAX_CHARS: usize = 60;

/// A file-name-safe form of `prompt`: lowercase ASCII letters and digits, runs of anything else
/// as one `-`, at most [`SLUG_MAX_CHARS`] characters; `empty` for a prompt with none.
pub fn slug(prompt: &str) -> String {
    let mut slug = String::new();
    for c in prompt.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_alphanumeric() {
            slug.push(c);
        } else if !slug.is_empty() && !slug.ends_with('-') {
            slug.push('-');
        }
        if slug.len() >= SLUG_MAX_CHARS {
            break;
        }
    }
    let slug = slug.trim_end_matches('-');
    if slug.is_empty() {
        "empty".into()
    } else {
        slug.into()
    }
}

/// `<line:05>-<image:02>-<seed>-<slug>.png`: line of the prompt file (0 for `--prompt`), index of
/// the image for that line, its seed.
pub fn image_name(line: usize, image: usize, seed: u64, prompt: &str) -> String {
    format!("{line:05}-{image:02}-{seed}-{}.png", slug(prompt))
}

/// The latents file written next to an image by `--save-latents`.
pub fn latents_path(image: &Path) -> PathBuf {
    image.with_extension("latents.safetensors")
}

/// Writes `path` through a temporary file in the same folder and a rename: `write` is given the
/// temporary path. Readers see the old file or the complete new one, never a partial one.
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let folder = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("output");
    let temporary = folder.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = write(&temporary).and_then(|()| {
        std::fs::File::open(&temporary)?.sync_all()?;
        std::fs::rename(&temporary, path)?;
        Ok(())
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

/// Writes an 8-bit RGB PNG, `rgb` row-major, with text chunks: `tEXt` when the text is Latin-1,
/// else UTF-8 `iTXt` (what PIL, and so AUTOMATIC1111, do), so prompts in any script survive.
pub fn write_png(path: &Path, rgb: &[u8], width: u32, height: u32, text: &[(&str, &str)]) -> Result<()> {
    write_atomic(path, |temporary| {
        let file = std::io::BufWriter::new(std::fs::File::create(temporary)?);
        let mut encoder = png::Encoder::new(file, width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        for (keyword, value) in text {
            if value.chars().all(|c| u32::from(c) < 256) {
                encoder.add_text_chunk(keyword.to_string(), value.to_string())?;
            } else {
                encoder.add_itxt_chunk(keyword.to_string(), value.to_string())?;
            }
        }
        let mut writer = encoder.write_header()?;
        writer.write_image_data(rgb)?;
        writer.finish()?;
        Ok(())
    })
}

/// Writes a generated image as a PNG carrying its settings: the AUTOMATIC1111 `parameters` chunk
/// and the sdfix JSON chunk ([`super::metadata`]). Equal settings give equal bytes.
pub fn write_image(path: &Path, image: &GeneratedImage) -> Result<()> {
    let parameters = image.settings.a1111_parameters();
    let settings_json = serde_json::to_string(&image.settings)?;
    write_png(
        path,
        &image.rgb,
        image.width as u32,
        image.height as u32,
        &[(PARAMETERS_CHUNK, &parameters), (SETTINGS_CHUNK, &settings_json)],
    )
}

/// The text chunks (`tEXt`, `zTXt`, `iTXt`) of a PNG, by keyword.
pub fn read_png_text(path: &Path) -> Result<HashMap<String, String>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .with_context(|| format!("{} is not a readable PNG", path.display()))?;
    let info = reader.info();
    let mut text = HashMap::new();
    for chunk in &info.uncompressed_latin1_text {
        text.insert(chunk.keyword.clone(), chunk.text.clone());
    }
    for chunk in &info.compressed_latin1_text {
        if let Ok(value) = chunk.get_text() {
            text.insert(chunk.keyword.clone(), value);
        }
    }
    for chunk in &info.utf8_text {
        if let Ok(value) = chunk.get_text() {
            text.insert(chunk.keyword.clone(), value);
        }
    }
    Ok(text)
}

/// Writes `latents` as a safetensors file with one tensor, "latents".
pub fn write_latents(path: &Path, latents: &Tensor) -> Result<()> {
    let tensors = HashMap::from([("latents".to_string(), latents.clone())]);
    write_atomic(path, |temporary| {
        Ok(candle_core::safetensors::save(&tensors, temporary)?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_safe_and_short() {
        assert_eq!(slug("Solid Black Background!"), "solid-black-background");
        assert_eq!(slug("  a/b\\c..d  "), "a-b-c-d");
        assert_eq!(slug(""), "empty");
        assert_eq!(slug("東京"), "empty");
        assert!(slug(&"word ".repeat(40)).len() <= SLUG_MAX_CHARS);
        assert_eq!(image_name(3, 1, 42, "a cat"), "00003-01-42-a-cat.png");
    }
}
