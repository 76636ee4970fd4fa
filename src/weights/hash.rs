//! AUTOMATIC1111's model and LoRA hashes, for the PNG metadata.
//!
//! - `Model hash:` is the first 10 hex digits of the checkpoint's SHA-256. Hashing 2-7 GB takes
//!   seconds, so the full digest is computed once and cached under the sdfix cache folder
//!   (`$SDFIX_CACHE/hashes`, see [`super::demo`]), keyed by the file's path, size and modification
//!   time: an edited or replaced file is hashed again.
//! - `Lora hashes:` use kohya's "addnet" hash: SHA-256 of a safetensors file's data after its
//!   header (so editing the metadata keeps the hash), first 12 digits.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

/// A1111's short model hash: the first 10 hex digits.
pub const MODEL_HASH_DIGITS: usize = 10;
/// Bytes read per hash update.
const CHUNK_BYTES: usize = 1 << 20;

/// Lower-case hex of a digest.
fn to_hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of bytes in memory, hex (img2img's pictures, recorded in their images).
pub fn sha256_bytes(bytes: &[u8]) -> String {
    to_hex(&Sha256::digest(bytes))
}

fn sha256_from(file: &mut File) -> Result<String> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; CHUNK_BYTES];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(to_hex(&hasher.finalize()))
}

/// The SHA-256 of `path`, hex.
pub fn sha256(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    sha256_from(&mut file).with_context(|| format!("cannot read {}", path.display()))
}

/// kohya's addnet hash of a safetensors file: SHA-256 of everything after the header.
pub fn addnet_hash(path: &Path) -> Result<String> {
    let label = path.display();
    let mut file = File::open(path).with_context(|| format!("cannot open {label}"))?;
    let mut length = [0u8; 8];
    file.read_exact(&mut length)
        .with_context(|| format!("{label} is too short for a safetensors file"))?;
    file.seek(SeekFrom::Start(8 + u64::from_le_bytes(length)))?;
    sha256_from(&mut file).with_context(|| format!("cannot read {label}"))
}

/// kohya's addnet hash of a safetensors file and the SHA-256 of the whole file, in one read.
pub fn addnet_and_file_sha256(path: &Path) -> Result<(String, String)> {
    let label = path.display();
    let mut file = File::open(path).with_context(|| format!("cannot open {label}"))?;
    let mut length = [0u8; 8];
    file.read_exact(&mut length)
        .with_context(|| format!("{label} is too short for a safetensors file"))?;
    let header_bytes = usize::try_from(u64::from_le_bytes(length))
        .with_context(|| format!("{label} is not a safetensors file (header length)"))?;
    let mut header = Vec::new();
    (&mut file)
        .take(header_bytes as u64)
        .read_to_end(&mut header)
        .with_context(|| format!("cannot read {label}"))?;
    anyhow::ensure!(
        header.len() == header_bytes,
        "{label} is too short for its safetensors header"
    );
    let mut whole = Sha256::new();
    whole.update(length);
    whole.update(&header);
    let mut data = Sha256::new();
    let mut buffer = vec![0u8; CHUNK_BYTES];
    loop {
        let n = file.read(&mut buffer).with_context(|| format!("cannot read {label}"))?;
        if n == 0 {
            break;
        }
        whole.update(&buffer[..n]);
        data.update(&buffer[..n]);
    }
    Ok((to_hex(&data.finalize()), to_hex(&whole.finalize())))
}

/// FNV-1a of the cache key's text.
fn key_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The file's SHA-256, from the cache when path, size and modification time are unchanged.
/// Returns the digest and whether it was computed now.
pub fn cached_sha256(path: &Path) -> Result<(String, bool)> {
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let key = format!("{}\n{}\n{modified}", canonical.display(), meta.len());
    let cache = super::demo::cache_root()
        .join("hashes")
        .join(format!("{:016x}.sha256", key_hash(&key)));
    if let Ok(text) = std::fs::read_to_string(&cache) {
        if let Some((digest, cached_key)) = text.split_once('\n') {
            if cached_key == key && digest.len() == 64 {
                return Ok((digest.to_string(), false));
            }
        }
    }
    let digest = sha256(path)?;
    // A cache that cannot be written costs a re-hash next time, nothing else.
    if let Some(dir) = cache.parent() {
        let _ = std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&cache, format!("{digest}\n{key}")));
    }
    Ok((digest, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_bytes() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), b"abc").unwrap();
        assert_eq!(
            sha256(file.path()).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn one_read_gives_the_addnet_hash_and_the_file_digest() {
        let file = tempfile::Builder::new().suffix(".safetensors").tempfile().unwrap();
        let mut bytes = 4u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}  data after the header");
        std::fs::write(file.path(), &bytes).unwrap();
        let (addnet, whole) = addnet_and_file_sha256(file.path()).unwrap();
        assert_eq!(addnet, addnet_hash(file.path()).unwrap());
        assert_eq!(whole, sha256(file.path()).unwrap());
    }
}
