//! Fuzzing the readers of files from the internet (issue 30): the safetensors header reader, the
//! restricted unpickler of `.ckpt` zips, and the LoRA reader. Whatever the bytes, each returns
//! its value or a one-line error naming the file: no panic, no allocation sized by a field the
//! file declares (the oracle and the mutators are in `fuzz/`).
//!
//! `cargo test --release --test fuzz_readers` replays the committed corpus and its regressions
//! (tests/fixtures/fuzz/READER/, made by scripts/make_fuzz_corpus.py) and runs a thousand
//! mutated cases per reader from a fixed seed. The long runs are ignored tests, one per reader
//! (docs/testing.md has what they covered):
//!
//! ```text
//! ulimit -v 16000000; FUZZ_SECONDS=600 FUZZ_SEED=3031 RUST_BACKTRACE=0 nice -n 19 \
//!     cargo test --release --test fuzz_readers -- --ignored --nocapture long_safetensors
//! ```
//!
//! (`long_ckpt`, `long_lora` likewise; without `FUZZ_SEED` the clock picks the seed, printed.
//! `ulimit -v` makes an allocation the watch cannot see, on another thread, abort the run rather
//! than the machine; `RUST_BACKTRACE=0` keeps candle's errors, which carry a backtrace then, short.)

mod fuzz;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::Init;
use sdfix::weights::lora::{AppliedLora, Component, LoraFile, Loras};
use sdfix::weights::safetensors_reader::SafetensorsReader;
use sdfix::weights::single_file::Checkpoint;

use fuzz::{Budget, Target};

#[global_allocator]
static ALLOCATOR: fuzz::Watching = fuzz::Watching;

/// Mutated cases per reader in the normal test run: about a second each on an idle core, the
/// same cases every time.
const SHORT_CASES: u64 = 1000;
const SHORT_SEED: u64 = 30;

fn fixtures(relative: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(relative)
}

fn push<T, E: Into<anyhow::Error>>(result: Result<T, E>, errors: &mut Vec<anyhow::Error>) -> Option<T> {
    result.map_err(|e| errors.push(e.into())).ok()
}

/// Every tensor read whole, in thirds, and through the backend as f32.
fn read_safetensors(path: &Path, errors: &mut Vec<anyhow::Error>) {
    let Some(reader) = push(SafetensorsReader::open(path), errors) else {
        return;
    };
    let _ = reader.metadata().len();
    let device = Device::Cpu;
    let names: Vec<String> = reader.names().cloned().collect();
    for name in &names {
        push(reader.load(name, &device), errors);
        for k in 0..3 {
            push(reader.load_part(name, k, 3, &device), errors);
        }
        if let Some(shape) = reader.shape(name).cloned() {
            push(reader.get(shape, name, Init::Const(0.), DType::F32, &device), errors);
        }
    }
}

/// The checkpoint opened as a single file is, then every tensor read whole and in thirds.
fn read_ckpt(path: &Path, errors: &mut Vec<anyhow::Error>) {
    let Some(checkpoint) = push(Checkpoint::open(path), errors) else {
        return;
    };
    let device = Device::Cpu;
    for key in checkpoint.keys() {
        let _ = checkpoint.shape(&key);
        push(checkpoint.load(&key, &device), errors);
        push(checkpoint.load_third(&key, 1, &device), errors);
    }
}

/// The LoRA read, then merged into the tiny model's UNet and text encoder, every weight read.
fn read_lora(path: &Path, errors: &mut Vec<anyhow::Error>) {
    let Some(file) = push(LoraFile::open(path), errors) else {
        return;
    };
    let loras = Loras {
        files: vec![AppliedLora {
            file: Arc::new(file),
            weight: 1.0,
        }],
    };
    let device = Device::Cpu;
    for (component, weights) in [
        (Component::Unet, "tiny-sd/unet/diffusion_pytorch_model.safetensors"),
        (Component::TextEncoder, "tiny-sd/text_encoder/model.safetensors"),
    ] {
        let model = SafetensorsReader::open(&fixtures(weights)).unwrap();
        let names = model.names().cloned().collect();
        let Some(patched) = push(loras.patch(component, Box::new(model), &names), errors) else {
            continue;
        };
        for name in &names {
            push(patched.get_unchecked(name, DType::F32, &device), errors);
        }
    }
}

fn safetensors_target() -> Target {
    Target {
        name: "safetensors",
        seeds: fuzz::corpus(&fixtures("fuzz/safetensors")),
        mutate: fuzz::safetensors::mutate,
        read: read_safetensors,
    }
}

fn ckpt_target() -> Target {
    Target {
        name: "ckpt",
        seeds: fuzz::corpus(&fixtures("fuzz/ckpt")),
        mutate: fuzz::pickle::mutate,
        read: read_ckpt,
    }
}

fn lora_target() -> Target {
    Target {
        name: "lora",
        seeds: fuzz::corpus(&fixtures("fuzz/lora")),
        mutate: fuzz::safetensors::mutate_lora,
        read: read_lora,
    }
}

/// The corpus and its regressions pass unmutated, then a fixed-seed run finds nothing.
fn short(target: Target) {
    let broken = fuzz::replay(&target);
    assert!(broken.is_empty(), "{}", broken.join("\n"));
    let report = fuzz::run(&target, SHORT_SEED, Budget::Cases(SHORT_CASES));
    eprintln!("{}", report.summary(target.name, SHORT_SEED));
    assert!(report.findings.is_empty(), "{}", report.findings_text());
}

/// A run of `FUZZ_SECONDS` (default 60) from `FUZZ_SEED` (default: the clock).
fn long(target: Target) {
    let seconds = std::env::var("FUZZ_SECONDS").map_or(60, |s| s.parse().expect("FUZZ_SECONDS is a number"));
    let seed = std::env::var("FUZZ_SEED").map_or_else(
        |_| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
        },
        |s| s.parse().expect("FUZZ_SEED is a number"),
    );
    let report = fuzz::run(&target, seed, Budget::Time(Duration::from_secs(seconds)));
    eprintln!("{}", report.summary(target.name, seed));
    for (kind, count) in &report.error_kinds {
        eprintln!("  {count:>8}  {kind}");
    }
    assert!(report.findings.is_empty(), "{}", report.findings_text());
}

#[test]
fn safetensors_reader_survives_mutated_headers() {
    short(safetensors_target());
}

#[test]
fn ckpt_reader_survives_mutated_pickles_and_zips() {
    short(ckpt_target());
}

#[test]
fn lora_reader_survives_mutated_files() {
    short(lora_target());
}

type Read = fn(&Path, &mut Vec<anyhow::Error>);

/// Each committed regression input is refused for the cause that was fixed. What the unfixed
/// readers did is in each comment; `handmade` inputs come from scripts/make_fuzz_corpus.py, the
/// others are the fuzzer's, as it saved them.
#[test]
fn regressions_are_refused_for_their_cause() {
    let cases: &[(&str, Read, &str)] = &[
        // candle allocated a BINUNICODE string's 4 GB length before reading a byte of it.
        (
            "ckpt/regressions/allocation-binunicode-length.pt",
            read_ckpt,
            "the pickle ends inside an opcode",
        ),
        // handmade: candle allocated the declared [2^31-1, 2, 3, 3] f16 tensor, 77 GB.
        (
            "ckpt/regressions/allocation-shape-past-storage.ckpt",
            read_ckpt,
            "does not fit in its 36-byte storage",
        ),
        // A tuple doubled through the memo: candle's copies ran the process out of memory.
        (
            "ckpt/regressions/out-of-memory-memo-doubling.ckpt",
            read_ckpt,
            "memo copies past",
        ),
        // A 10,000-item list memoised under thousands of indices, each a copy: out of memory.
        (
            "ckpt/regressions/out-of-memory-memo-puts.ckpt",
            read_ckpt,
            "memo copies past",
        ),
        // handmade: candle took a fourth argument out of a 3-tuple (a panic).
        (
            "ckpt/regressions/panic-short-tensor-rebuild.ckpt",
            read_ckpt,
            "_rebuild_tensor_v2 is called with other than a tuple of at least 4 arguments",
        ),
        // 100,000 nested TUPLE1s: candle dropped them recursively and overflowed the stack.
        (
            "ckpt/regressions/stack-overflow-nested-tuples.pt",
            read_ckpt,
            "nested more than 64 deep",
        ),
        // A second pickle whose storages are missing: candle's "specified file not found in archive"
        // named no file.
        (
            "ckpt/regressions/unnamed-error-missing-storage.ckpt",
            read_ckpt,
            ": cannot read its storage second/archive/data/",
        ),
        // Strides that are neither C nor Fortran order: candle's error named no file.
        (
            "ckpt/regressions/unnamed-error-non-contiguous.pt",
            read_ckpt,
            "which sdfix cannot read",
        ),
        // A storage's local header cut short: the zip error named no file.
        (
            "ckpt/regressions/unnamed-error-truncated-entry.ckpt",
            read_ckpt,
            "cannot read its storage archive/data/2: invalid Zip archive",
        ),
        // A newline in a tensor name (a byte of "weight" mutated): errors naming it ran over two
        // lines, and a terminal escape there would have reached the terminal.
        (
            "ckpt/regressions/two-line-error-newline-in-name.ckpt",
            read_ckpt,
            "holds a control character",
        ),
        // A newline in the zip entry name of the pickle (found by the second long run), in the
        // error saying it could not be read.
        (
            "ckpt/regressions/two-line-error-newline-in-entry-name.ckpt",
            read_ckpt,
            r#"zip entry "arc\nive/data.pkl" holds a control character"#,
        ),
        // handmade: a newline in a tensor name of a safetensors header.
        (
            "safetensors/regressions/two-line-error-newline-in-name.safetensors",
            read_safetensors,
            r#"tensor name "w\n\u{1b}[2J" holds a control character"#,
        ),
        // handmade: rank-1 factors of an 8192x8192 update for a 16x4x3x3 weight, multiplied
        // (256 MB) before candle's reshape refused it.
        (
            "lora/regressions/allocation-huge-update.safetensors",
            read_lora,
            "its update is 8192x8192, which does not fit conv_in.weight",
        ),
        // A [2, 1, 1] down for conv_in: candle's reshape error named no file.
        (
            "lora/regressions/unnamed-error-conv-shape.safetensors",
            read_lora,
            "its update is 16x1",
        ),
        // A scalar lora_A: candle's "dimension index 0 out of range" named no file.
        (
            "lora/regressions/unnamed-error-scalar-down.safetensors",
            read_lora,
            "are not [out, rank(, 1, 1)] and [rank, in(, k, k)]",
        ),
        // lora_up and lora_down swapped: a 4x4 update for a 16x16 weight, refused by candle's
        // reshape without the file's name.
        (
            "lora/regressions/unnamed-error-swapped-up-down.safetensors",
            read_lora,
            "its update is 4x4",
        ),
    ];
    for (file, read, cause) in cases {
        let path = fixtures(&format!("fuzz/{file}"));
        let mut errors = Vec::new();
        read(&path, &mut errors);
        let messages: Vec<String> = errors.iter().map(|e| format!("{e:#}")).collect();
        assert!(
            messages
                .iter()
                .any(|m| m.contains(cause) && m.contains(&path.display().to_string())),
            "{file}: expected {cause:?} in one of {messages:#?}"
        );
    }
}

#[test]
#[ignore = "long fuzz run: FUZZ_SECONDS=600 cargo test --release --test fuzz_readers -- --ignored long_safetensors"]
fn long_safetensors() {
    long(safetensors_target());
}

#[test]
#[ignore = "long fuzz run: FUZZ_SECONDS=600 cargo test --release --test fuzz_readers -- --ignored long_ckpt"]
fn long_ckpt() {
    long(ckpt_target());
}

#[test]
#[ignore = "long fuzz run: FUZZ_SECONDS=600 cargo test --release --test fuzz_readers -- --ignored long_lora"]
fn long_lora() {
    long(lora_target());
}
