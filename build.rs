//! Names the cache folders of the files `src/weights/demo.rs` builds into the binary (the demo
//! models and the CLIP tokenizer) by a hash of their content, computed here at build time: hashed
//! by the program at run time, its own embedded bytes became resident memory on every run (the
//! tokenizer's 1.4 MB in every single-file run, a demo model's 9 MB in every demo run; issue 19,
//! docs/performance.md).
//!
//! The hash covers every file under `models/demo` and `models/demo-flawed` and `demo.rs` itself
//! (its inline tokenizer files and the list of what it embeds): a superset of the embedded bytes,
//! so any change to them names new folders, and the old ones are simply no longer used.
//!
//! Under the `cuda` feature only, it also compiles our CUDA kernels (`src/kernels/cuda/*.cu`) to
//! PTX with nvcc (issue 32): for `compute_80`, the PTX embedded in the binary (the driver JITs it
//! for sm_80 and sm_90 alike), and for `compute_90` as a check that it compiles there too. The CPU
//! build never runs nvcc. nvcc is `$NVCC` or the one on `PATH` (scripts/build_cuda.sh sets both up).

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

/// nvcc's PTX of each `.cu` file in `src/kernels/cuda` into `OUT_DIR/NAME.ptx` (compute_80), and
/// a compile for compute_90 as a check.
fn compile_cuda_kernels() {
    let dir = Path::new("src/kernels/cuda");
    println!("cargo:rerun-if-changed={}", dir.display());
    println!("cargo:rerun-if-env-changed=NVCC");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let mut sources = Vec::new();
    files_under(dir, &mut sources);
    for source in sources.iter().filter(|p| p.extension().is_some_and(|e| e == "cu")) {
        println!("cargo:rerun-if-changed={}", source.display());
        let stem = source
            .file_stem()
            .expect("a .cu file name")
            .to_string_lossy()
            .into_owned();
        for (arch, name) in [
            ("compute_80", format!("{stem}.ptx")),
            ("compute_90", format!("{stem}.sm90.ptx")),
        ] {
            let output = out_dir.join(name);
            let status = std::process::Command::new(&nvcc)
                .args(["--ptx", "-O3", "-std=c++17", &format!("-arch={arch}"), "-o"])
                .arg(&output)
                .arg(source)
                .status()
                .unwrap_or_else(|e| {
                    panic!("cannot run {nvcc} (the cuda feature needs nvcc; see scripts/build_cuda.sh): {e}")
                });
            assert!(status.success(), "{nvcc} failed on {} for {arch}", source.display());
        }
    }
}

fn main() {
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        compile_cuda_kernels();
    }
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
