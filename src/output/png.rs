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
/// as one `-`, at most 60 characters (`SLUG_MAX_CHARS`); `empty` for a prompt with none.
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

/// What an [`image_name`] says: prompt-file line, image index, seed, prompt slug.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageName {
    pub line: usize,
    pub image: usize,
    pub seed: u64,
    pub slug: String,
}

/// Reads a name made by [`image_name`] back; `None` for any other file name.
pub fn parse_image_name(name: &str) -> Option<ImageName> {
    let mut parts = name.strip_suffix(".png")?.splitn(4, '-');
    let line = parts.next()?;
    let image = parts.next()?;
    // The fixed-width fields are digits only (`parse` alone would take a sign).
    if !line.bytes().chain(image.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(ImageName {
        line: line.parse().ok()?,
        image: image.parse().ok()?,
        seed: parts.next()?.parse().ok()?,
        slug: parts.next().filter(|s| !s.is_empty())?.to_string(),
    })
}

/// The latents file written next to an image by `--save-latents`.
pub fn latents_path(image: &Path) -> PathBuf {
    image.with_extension("latents.safetensors")
}

/// The temporary name [`write_atomic`] writes `name` under: hidden, and carrying the writer's
/// PID, so workers sharing a folder never share a temporary and a leftover names its owner.
fn temporary_name(name: &str, pid: u32) -> String {
    format!(".{name}.{pid}.tmp")
}

/// The PID in a name made by [`temporary_name`], if it is one.
fn temporary_owner(file_name: &str) -> Option<u32> {
    let inner = file_name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let (name, pid) = inner.rsplit_once('.')?;
    (!name.is_empty()).then_some(())?;
    pid.parse().ok()
}

/// How old a temporary must be before another run may remove it. A PNG is written in
/// milliseconds; the age guards the one case the PID test cannot see: a worker on another host
/// sharing the folder (NFS, a Kubernetes volume) whose PID happens not to be running here.
pub const STALE_TEMPORARY_AGE: std::time::Duration = std::time::Duration::from_secs(60);

/// Removes the temporaries that killed workers left in `folder` (`.NAME.PID.tmp` whose PID is not
/// running on this host and that are older than [`STALE_TEMPORARY_AGE`]) and returns their
/// paths. Needs `/proc` to tell whether a PID runs; without it (not Linux) nothing is removed.
/// A missing folder has nothing to remove.
pub fn remove_stale_temporaries(folder: &Path) -> Result<Vec<PathBuf>> {
    let proc = Path::new("/proc");
    if !proc.join("self").exists() || !folder.is_dir() {
        return Ok(Vec::new());
    }
    let entries = std::fs::read_dir(folder).with_context(|| format!("cannot list {}", folder.display()))?;
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name.to_str().and_then(temporary_owner) else {
            continue;
        };
        let age = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|modified| modified.elapsed().ok());
        let old = age.is_some_and(|age| age >= STALE_TEMPORARY_AGE);
        if old && !proc.join(pid.to_string()).exists() {
            let path = entry.path();
            std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
            removed.push(path);
        }
    }
    removed.sort();
    Ok(removed)
}

/// Writes `path` through a temporary file in the same folder and a rename: `write` is given the
/// temporary path. Readers see the old file or the complete new one, never a partial one.
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let folder = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("output");
    let temporary = folder.join(temporary_name(name, std::process::id()));
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

/// Encodes an 8-bit RGB PNG, `rgb` row-major, with text chunks into `out`: `tEXt` when the text
/// is Latin-1, else UTF-8 `iTXt` (what PIL, and so AUTOMATIC1111, do), so prompts in any script
/// survive.
pub fn encode_png(out: impl std::io::Write, rgb: &[u8], width: u32, height: u32, text: &[(&str, &str)]) -> Result<()> {
    let mut encoder = png::Encoder::new(out, width, height);
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
}

/// Writes an 8-bit RGB PNG file atomically ([`encode_png`], [`write_atomic`]).
pub fn write_png(path: &Path, rgb: &[u8], width: u32, height: u32, text: &[(&str, &str)]) -> Result<()> {
    write_atomic(path, |temporary| {
        let file = std::io::BufWriter::new(std::fs::File::create(temporary)?);
        encode_png(file, rgb, width, height, text)
    })
}

/// The text chunks a generated image carries: the AUTOMATIC1111 `parameters` chunk and the
/// sdfix JSON chunk ([`super::metadata`]).
fn image_text(image: &GeneratedImage) -> Result<[(&'static str, String); 2]> {
    Ok([
        (PARAMETERS_CHUNK, image.settings.a1111_parameters()),
        (SETTINGS_CHUNK, serde_json::to_string(&image.settings)?),
    ])
}

/// Writes a generated image as a PNG carrying its settings. Equal settings give equal bytes.
pub fn write_image(path: &Path, image: &GeneratedImage) -> Result<()> {
    let text = image_text(image)?;
    let text = text.each_ref().map(|(k, v)| (*k, v.as_str()));
    write_png(path, &image.rgb, image.width as u32, image.height as u32, &text)
}

/// A generated image as PNG bytes in memory, with the same chunks as [`write_image`] writes
/// (what the server sends).
pub fn image_png_bytes(image: &GeneratedImage) -> Result<Vec<u8>> {
    let text = image_text(image)?;
    let text = text.each_ref().map(|(k, v)| (*k, v.as_str()));
    let mut bytes = Vec::new();
    encode_png(&mut bytes, &image.rgb, image.width as u32, image.height as u32, &text)?;
    Ok(bytes)
}

/// The text chunks (`tEXt`, `zTXt`, `iTXt`) of a PNG, by keyword.
pub fn read_png_text(path: &Path) -> Result<HashMap<String, String>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    png_text(std::io::BufReader::new(file)).with_context(|| format!("{} is not a readable PNG", path.display()))
}

/// [`read_png_text`] of PNG bytes in memory (the server's `/sdapi/v1/png-info`). The chunks
/// before the image data are read, where PIL (so AUTOMATIC1111) and sdfix write them.
pub fn png_text(source: impl std::io::BufRead + std::io::Seek) -> Result<HashMap<String, String>> {
    let reader = png::Decoder::new(source).read_info()?;
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

    #[test]
    fn image_names_read_back() {
        let name = image_name(12, 3, 7, "a red-circle");
        let parsed = parse_image_name(&name).unwrap();
        assert_eq!(
            (parsed.line, parsed.image, parsed.seed, parsed.slug.as_str()),
            (12, 3, 7, "a-red-circle")
        );
        assert_eq!(parse_image_name("grid.png"), None);
        assert_eq!(parse_image_name("00001-+1-7-a.png"), None);
        assert_eq!(parse_image_name(&name.replace(".png", ".jpg")), None);
    }

    #[test]
    fn temporaries_name_their_writer() {
        let name = temporary_name("00001-00-7-a.b.png", 4321);
        assert_eq!(temporary_owner(&name), Some(4321));
        assert_eq!(temporary_owner("00001-00-7-a.png"), None);
        assert_eq!(temporary_owner(".hidden.tmp"), None);
        assert_eq!(temporary_owner("..12.tmp"), None);
    }
}
