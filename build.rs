//! Names the cache folders of the files `src/weights/demo.rs` builds into the binary (the demo
//! models and the CLIP tokenizer) by a hash of their content, computed here at build time: hashed
//! by the program at run time, its own embedded bytes became resident memory on every run (the
//! tokenizer's 1.4 MB in every single-file run, a demo model's 9 MB in every demo run; issue 19,
//! docs/performance.md).
//!
//! The hash covers every file under `models/demo` and `models/demo-flawed` and `demo.rs` itself
//! (its inline tokenizer files and the list of what it embeds): a superset of the embedded bytes,
//! so any change to them names new folders, and the old ones are simply no longer used.

use std::fs;
use std::path::{Path, PathBuf};

/// FNV-1a, 64-bit, over each file's path (relative to the crate) and bytes.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

fn fnv(mut hash: u64, bytes: &[u8]) -> u64 {
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// Every file under `dir`, recursively, in a stable order.
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("a readable directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn main() {
    let inputs = ["models/demo", "models/demo-flawed", "src/weights/demo.rs"];
    let mut files = Vec::new();
    for input in inputs {
        println!("cargo:rerun-if-changed={input}");
        let path = Path::new(input);
        if path.is_dir() {
            files_under(path, &mut files);
        } else {
            files.push(path.to_path_buf());
        }
    }
    let mut hash = FNV_OFFSET;
    for file in &files {
        let relative = file.to_string_lossy().replace('\\', "/");
        hash = fnv(hash, relative.as_bytes());
        let bytes = fs::read(file).unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        hash = fnv(hash, &bytes);
    }
    println!("cargo:rustc-env=SDFIX_EMBEDDED_HASH={hash:016x}");
}
