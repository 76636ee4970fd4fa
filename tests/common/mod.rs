//! Helpers shared by the black-box tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A path under tests/fixtures.
pub fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(path)
}

/// Runs the sdfix binary with `args`.
pub fn sdfix(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdfix"))
        .args(args)
        .output()
        .expect("sdfix runs")
}

/// max |a - b| over all elements, as f32.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
