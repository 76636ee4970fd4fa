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

/// The largest difference between two 8-bit pixel buffers of the same size.
pub fn max_pixel_diff(ours: &[u8], expected: &[u8]) -> u8 {
    assert_eq!(ours.len(), expected.len(), "pixel buffers of different sizes");
    ours.iter()
        .zip(expected)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0)
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

/// The sdfix arguments of reference case `name` in tests/fixtures/refs/STEM.json, `fixtures:`
/// paths made absolute.
pub fn reference_case_args(stem: &str, name: &str) -> Vec<String> {
    let text = std::fs::read_to_string(fixture(&format!("refs/{stem}.json"))).unwrap();
    let cases: HashMap<String, Vec<String>> = serde_json::from_str(&text).unwrap();
    cases[name]
        .iter()
        .map(|a| match a.strip_prefix("fixtures:") {
            Some(rest) => fixture(rest).to_string_lossy().into_owned(),
            None => a.clone(),
        })
        .collect()
}

/// Runs reference case `name` of tests/fixtures/refs/STEM.* through `sdfix generate` (seed 0,
/// the tiny-sd fixture unless the case names a model, then `extra`) from the case's initial
/// latents; returns the final latents and images.
pub fn run_reference_case(stem: &str, name: &str, extra: &[&str]) -> (Vec<candle_core::Tensor>, Vec<image::RgbImage>) {
    let mut args = vec!["--seed".to_string(), "0".to_string()];
    let case = reference_case_args(stem, name);
    if !case.iter().any(|a| a == "--model") {
        args.extend(["--model".into(), fixture("tiny-sd").to_string_lossy().into_owned()]);
    }
    args.extend(case);
    args.extend(extra.iter().map(|s| s.to_string()));
    generate_from_latents(&reference_tensors(stem)[&format!("{name}.initial")], &args)
}

/// Asserts that reference case `name` of STEM matches diffusers' final latents and images
/// within the tolerances; `hint` says how to regenerate the references.
pub fn assert_reference_case(stem: &str, name: &str, tolerances: (f32, u8), hint: &str) {
    let refs = reference_tensors(stem);
    let (latents, images) = run_reference_case(stem, name, &[]);
    assert_matches_reference(
        name,
        (&latents, &images),
        &refs[&format!("{name}.final")],
        &refs[&format!("{name}.image")],
        tolerances,
        hint,
    );
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

/// Runs `sdfix generate` with `args` from the initial latents `initial` (saved to a file and
/// passed as `--latents`), saving each image's final latents; returns those latents and the
/// images, in file order. The reference-case tests (generate, samplers, img2img) share it.
pub fn generate_from_latents(
    initial: &candle_core::Tensor,
    args: &[String],
) -> (Vec<candle_core::Tensor>, Vec<image::RgbImage>) {
    let dir = tempfile::tempdir().unwrap();
    let latents_file = dir.path().join("initial.safetensors");
    candle_core::safetensors::save(
        &HashMap::from([("latents".to_string(), initial.clone())]),
        &latents_file,
    )
    .unwrap();
    let out_dir = dir.path().join("out");
    let mut all: Vec<String> = vec!["generate".into(), "--save-latents".into(), "--quiet".into()];
    all.extend(["--latents".into(), latents_file.to_string_lossy().into_owned()]);
    all.extend(["--out-dir".into(), out_dir.to_string_lossy().into_owned()]);
    all.extend(args.iter().cloned());
    let arg_refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let out = sdfix(&arg_refs);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let images = pngs(&out_dir);
    let latents = images
        .iter()
        .map(|p| {
            let mut t =
                candle_core::safetensors::load(p.with_extension("latents.safetensors"), &candle_core::Device::Cpu)
                    .unwrap();
            t.remove("latents").unwrap()
        })
        .collect();
    let pictures = images.iter().map(|p| image::open(p).unwrap().to_rgb8()).collect();
    (latents, pictures)
}

/// Asserts that `latents` and `images` (from [`generate_from_latents`]) match the reference
/// batch `reference_latents` (b, c, h, w) and `reference_images` (b, 3, h, w, u8): latents within
/// `latent_tolerance`, every pixel within `pixel_tolerance`; `hint` says how to regenerate.
pub fn assert_matches_reference(
    name: &str,
    (latents, images): (&[candle_core::Tensor], &[image::RgbImage]),
    reference_latents: &candle_core::Tensor,
    reference_images: &candle_core::Tensor,
    (latent_tolerance, pixel_tolerance): (f32, u8),
    hint: &str,
) {
    let reference_images = reference_images.permute((0, 2, 3, 1)).unwrap();
    assert_eq!(latents.len(), reference_latents.dim(0).unwrap(), "{name}: image count");
    for (k, (ours, picture)) in latents.iter().zip(images).enumerate() {
        let diff = max_abs_diff(ours, &reference_latents.get(k).unwrap());
        assert!(
            diff <= latent_tolerance,
            "{name} image {k}: final latents differ by {diff:e}; {hint}"
        );
        let expected = reference_images.get(k).unwrap();
        let (h, w, _) = expected.dims3().unwrap();
        assert_eq!(
            (picture.height() as usize, picture.width() as usize),
            (h, w),
            "{name}: image size"
        );
        let expected = expected.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let worst = max_pixel_diff(picture.as_raw(), &expected);
        eprintln!("{name} image {k}: latents {diff:e}, pixels {worst}/255");
        assert!(
            worst <= pixel_tolerance,
            "{name} image {k}: a pixel differs by {worst}/255; {hint}"
        );
    }
}

/// Runs `sdfix generate --prompts FILE.jsonl` in `dir` with `lines` (JSON objects, one per
/// line) at `--batch-size batch`, plus `extra`; returns each line's PNG files (bytes, in image
/// order) keyed by the line's text, so that runs in another line order compare line by line.
pub fn run_prompt_lines(
    dir: &Path,
    model: &str,
    lines: &[String],
    batch: usize,
    extra: &[&str],
) -> HashMap<String, Vec<Vec<u8>>> {
    let file = dir.join(format!("lines-{batch}-{}.jsonl", lines.len()));
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let out = dir.join(format!(
        "out-{}",
        RUNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    let batch = batch.to_string();
    let mut args = vec![
        "generate",
        "--model",
        model,
        "--prompts",
        file.to_str().unwrap(),
        "--batch-size",
        &batch,
        "--out-dir",
        out.to_str().unwrap(),
        "-q",
    ];
    args.extend(extra);
    let run = sdfix(&args);
    assert!(
        run.status.success(),
        "generate {args:?} failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let mut by_line: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
    for (number, line) in lines.iter().enumerate() {
        // Files are <line:05>-<image:02>-...png, lines counted from 1.
        let prefix = format!("{:05}-", number + 1);
        let mut files: Vec<PathBuf> = pngs(&out)
            .into_iter()
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(&prefix))
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no image for line {line}");
        let images = files.iter().map(|f| std::fs::read(f).unwrap());
        by_line.entry(line.clone()).or_default().extend(images);
    }
    by_line
}

/// Pictures the mixed-batch tests start from, written into `dir`: `grey.png` (32x32), `ramp.png`
/// (40x32, so it is fitted to the size made) and `mask.png` (repaints the right half).
pub fn write_pictures(dir: &Path) {
    image::RgbImage::from_pixel(32, 32, image::Rgb([128, 128, 128]))
        .save(dir.join("grey.png"))
        .unwrap();
    image::RgbImage::from_fn(40, 32, |x, y| {
        image::Rgb([(x * 6) as u8, (y * 7) as u8, ((x + y) * 3) as u8])
    })
    .save(dir.join("ramp.png"))
    .unwrap();
    image::GrayImage::from_fn(32, 32, |x, _| image::Luma([if x >= 16 { 255 } else { 0 }]))
        .save(dir.join("mask.png"))
        .unwrap();
}
