//! Helpers shared by the black-box tests.
#![allow(dead_code)]

use std::collections::HashMap;
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

/// The reference tensors of tests/fixtures/refs/STEM.safetensors (made by the scripts that
/// run diffusers).
pub fn reference_tensors(stem: &str) -> HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(fixture(&format!("refs/{stem}.safetensors")), &candle_core::Device::Cpu).unwrap()
}

/// The sdfix arguments of reference case `name` in tests/fixtures/refs/STEM.json.
pub fn reference_case_args(stem: &str, name: &str) -> Vec<String> {
    let text = std::fs::read_to_string(fixture(&format!("refs/{stem}.json"))).unwrap();
    let cases: HashMap<String, Vec<String>> = serde_json::from_str(&text).unwrap();
    cases[name].clone()
}

/// The PNG files of `dir`, sorted.
pub fn pngs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    files.sort();
    files
}
