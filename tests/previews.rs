//! Live previews: A1111's "Approx cheap" factors and 8-bit conversion against A1111's own code
//! (torch einsum, numpy cast), TAESD's decoder against diffusers' `AutoencoderTiny` on random
//! weights (tests/fixtures/tiny-taesd, tests/fixtures/refs/previews.safetensors, from
//! `scripts/make_taesd_refs.py`), then `generate --preview` black-box: the file, its atomic
//! rewrites, and bad input. The server's `current_image` is tested in tests/serve.rs.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use common::{fixture, max_abs_diff, pngs, reference_tensors, sdfix};
use sdfix::engine::preview::to_rgb8_truncated;
use sdfix::model::latent_rgb::{LatentRgb, SDXL_FACTORS, SD_FACTORS};
use sdfix::weights::taesd::TaesdFolder;

const REGENERATE: &str = "regenerate with: .venv-oracle/bin/python scripts/make_taesd_refs.py";
/// The bar for TAESD against diffusers.
const TAESD_TOLERANCE: f32 = 1e-4;
/// Our sum over 4 channels in order against torch's einsum (a matmul): rounding only.
const APPROX_TOLERANCE: f32 = 1e-6;

fn assert_approx_matches_a1111(family: &str, factors: LatentRgb) {
    let refs = reference_tensors("previews");
    let latents = &refs["approx_latents"];
    let ours = factors.apply(latents).unwrap();
    let gap = max_abs_diff(&ours, &refs[&format!("approx_{family}")]);
    assert!(
        gap < APPROX_TOLERANCE,
        "{family}: approx-cheap differs from A1111's einsum by {gap:e}; {REGENERATE}"
    );
    // 8-bit as A1111's single_sample_to_image (truncation), image by image.
    let expected = &refs[&format!("approx_{family}_u8")];
    let (b, _, h, w) = ours.dims4().unwrap();
    for i in 0..b {
        let image = ours.get(i).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let rgb = to_rgb8_truncated(&image, h * w);
        let want = expected.get(i).unwrap().flatten_all().unwrap().to_vec1::<u8>().unwrap();
        assert_eq!(
            rgb, want,
            "{family} image {i}: 8-bit preview differs from A1111's; {REGENERATE}"
        );
    }
}

#[test]
fn approx_cheap_sd_matches_a1111() {
    assert_approx_matches_a1111("sd", SD_FACTORS);
}

#[test]
fn approx_cheap_sdxl_matches_a1111() {
    assert_approx_matches_a1111("sdxl", SDXL_FACTORS);
}

#[test]
fn taesd_decoder_matches_diffusers_autoencoder_tiny() {
    let refs = reference_tensors("previews");
    let folder = TaesdFolder::open(&fixture("tiny-taesd")).unwrap();
    let decoder = folder.load_decoder(&Device::Cpu, DType::F32).unwrap();
    let decoded = decoder.decode(&refs["taesd_latents"]).unwrap();
    let expected = &refs["taesd_decoded"];
    assert_eq!(decoded.dims(), expected.dims());
    let gap = max_abs_diff(&decoded, expected);
    assert!(
        gap < TAESD_TOLERANCE,
        "TAESD differs from diffusers by {gap:e}; {REGENERATE}"
    );
    // Not trivially equal: the decode depends on the latents.
    let zeros = decoder.decode(&refs["taesd_latents"].zeros_like().unwrap()).unwrap();
    assert!(max_abs_diff(&zeros, expected) > 100.0 * TAESD_TOLERANCE);
}

/// A copy of tests/fixtures/tiny-taesd in `dir`, with `edit` applied to its config.
fn taesd_copy(dir: &Path, name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let folder = dir.join(name);
    std::fs::create_dir_all(&folder).unwrap();
    let source = fixture("tiny-taesd");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(folder.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(
        source.join("diffusion_pytorch_model.safetensors"),
        folder.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    folder
}

/// `generate` on the tiny SD fixture with `extra`, in `out_dir`.
fn generate(out_dir: &Path, extra: &[&str]) -> std::process::Output {
    let model = fixture("tiny-sd");
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a red circle",
        "--seed",
        "5",
        "--out-dir",
        out_dir.to_str().unwrap(),
    ];
    args.extend(extra);
    sdfix(&args)
}

fn read_png(path: &Path) -> image::RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{} is not a readable PNG: {e}", path.display()))
        .to_rgb8()
}

/// Files in `dir` whose names say they are temporaries (`.NAME.PID.tmp`).
fn temporaries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

/// The preview left behind is the last step's: approx-cheap of the final x0, which for Euler's
/// last step (to sigma 0) is the final latents, drawn as A1111 draws it.
#[test]
fn the_preview_file_ends_as_the_last_steps_approx_cheap_picture() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let preview = dir.path().join("preview.png");
    let result = generate(
        &out,
        &[
            "--steps",
            "6",
            "--sampler",
            "euler",
            "--preview",
            preview.to_str().unwrap(),
            "--preview-every",
            "4",
            "--save-latents",
        ],
    );
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    let picture = read_png(&preview);
    // tiny-sd: 16x16 images, latents 8x8; approx-cheap is at latent size.
    assert_eq!(picture.dimensions(), (8, 8));
    assert!(temporaries(dir.path()).is_empty(), "{:?}", temporaries(dir.path()));
    let image = pngs(&out).remove(0);
    let latents_path = image.with_extension("latents.safetensors");
    let latents = candle_core::safetensors::load(&latents_path, &Device::Cpu).unwrap()["latents"].clone();
    let rgb = SD_FACTORS.apply(&latents.unsqueeze(0).unwrap()).unwrap();
    let expected = to_rgb8_truncated(&rgb.flatten_all().unwrap().to_vec1::<f32>().unwrap(), 64);
    let worst = common::max_pixel_diff(picture.as_raw(), &expected);
    // x0 of the last step equals the final latents up to f32 rounding (one 8-bit level).
    assert!(
        worst <= 1,
        "preview differs from approx-cheap of the final latents by {worst} levels"
    );
}

#[test]
fn a_batch_previews_as_a_grid_and_taesd_at_full_size() {
    let dir = tempfile::tempdir().unwrap();
    let preview = dir.path().join("p.png");
    let taesd = fixture("tiny-taesd");
    let result = generate(
        &dir.path().join("out"),
        &[
            "--steps",
            "3",
            "--num-images",
            "3",
            "--batch-size",
            "3",
            "--preview",
            preview.to_str().unwrap(),
            "--taesd",
            taesd.to_str().unwrap(),
        ],
    );
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    // 3 images: round(sqrt(3)) = 2 rows of 2 columns; TAESD draws 8x the 8x8 latents.
    let picture = read_png(&preview);
    assert_eq!(picture.dimensions(), (2 * 64, 2 * 64));
    // The fourth cell is empty: black, as A1111's grid.
    assert!(picture
        .enumerate_pixels()
        .filter(|(x, y, _)| *x >= 64 && *y >= 64)
        .all(|(_, _, p)| p.0 == [0, 0, 0]));
    assert!(temporaries(dir.path()).is_empty());
}

/// The file is there, whole, while sampling still runs, and changes as it goes.
#[test]
fn the_preview_is_rewritten_while_sampling_runs() {
    let dir = tempfile::tempdir().unwrap();
    let preview = dir.path().join("live.png");
    let model = fixture("tiny-sd");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sdfix"))
        .args([
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "x",
            "--seed",
            "1",
        ])
        .args(["--steps", "150", "--width", "64", "--height", "64"])
        .args(["--preview", preview.to_str().unwrap(), "--out-dir"])
        .arg(dir.path().join("out"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let mut seen: Vec<Vec<u8>> = Vec::new();
    while child.try_wait().unwrap().is_none() && started.elapsed() < Duration::from_secs(120) {
        if let Ok(bytes) = std::fs::read(&preview) {
            // Every read is a complete PNG: the rename replaces the file whole.
            let picture = image::load_from_memory(&bytes).expect("a preview read mid-run is a whole PNG");
            assert_eq!((picture.width(), picture.height()), (32, 32));
            if seen.last() != Some(&bytes) {
                seen.push(bytes);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = child.wait().unwrap();
    assert!(status.success());
    assert!(
        seen.len() >= 2,
        "expected the preview to change while the run went on, saw {} version(s)",
        seen.len()
    );
    assert!(temporaries(dir.path()).is_empty());
}

/// Exit code 2, one `error:` line naming `needle`, no image and no preview written.
fn assert_refused(extra: &[&str], needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let result = generate(&out, extra);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(2), "{extra:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let line = stderr.lines().find(|l| l.starts_with("error:")).unwrap_or_default();
    assert!(line.contains(needle), "{extra:?}: expected {needle:?} in {stderr}");
    assert!(!out.exists() || pngs(&out).is_empty(), "{extra:?} wrote an image");
}

#[test]
fn bad_preview_flags_are_refused_with_the_flag_named() {
    let dir = tempfile::tempdir().unwrap();
    let preview = dir.path().join("p.png");
    let preview = preview.to_str().unwrap();
    assert_refused(&["--preview", preview, "--preview-every", "0"], "--preview-every");
    assert_refused(
        &["--preview-every", "2"],
        "--preview-every sets up previews; add --preview",
    );
    assert_refused(&["--taesd", "x"], "--taesd sets up previews; add --preview");
    assert_refused(
        &["--preview", preview, "--preview-method", "taesd"],
        "--preview-method taesd needs --taesd",
    );
    assert_refused(&["--preview", preview, "--preview-method", "full"], "--preview-method");
    assert_refused(
        &["--preview", "/no/such/folder/p.png"],
        "--preview /no/such/folder/p.png: no folder",
    );
    assert_refused(&["--preview", "p.jpg"], "--preview p.jpg: give a .png");
    assert_refused(
        &["--preview", preview, "--taesd", "/no/such/taesd"],
        "--taesd /no/such/taesd: no such folder",
    );
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_refused(
        &["--preview", preview, "--taesd", empty.to_str().unwrap()],
        "no config.json",
    );
    let taesd = fixture("tiny-taesd");
    assert_refused(
        &[
            "--preview",
            preview,
            "--taesd",
            taesd.to_str().unwrap(),
            "--preview-method",
            "approx-cheap",
        ],
        "--taesd is only used by --preview-method taesd",
    );
    let wide = taesd_copy(dir.path(), "taesd16", |c| c["latent_channels"] = 16.into());
    assert_refused(
        &["--preview", preview, "--taesd", wide.to_str().unwrap()],
        "it decodes 16 latent channels, this model has 4",
    );
    let mixed = taesd_copy(dir.path(), "mixed", |c| {
        c["decoder_block_out_channels"] = serde_json::json!([8, 16, 8, 8])
    });
    assert_refused(
        &["--preview", preview, "--taesd", mixed.to_str().unwrap()],
        "decoder_block_out_channels",
    );
    // A config that does not match the weights: the loader names the file.
    let deeper = taesd_copy(dir.path(), "deeper", |c| {
        c["num_decoder_blocks"] = serde_json::json!([3, 3, 3, 2])
    });
    assert_refused(&["--preview", preview, "--taesd", deeper.to_str().unwrap()], "--taesd");
    assert!(!Path::new(preview).exists(), "a refused run left a preview");
}

/// SDXL's TAESD cannot be told from SD's by its weights; a folder named taesdxl on an SD model
/// draws, with a warning (A1111 picks the file by name the same way).
#[test]
fn a_taesdxl_folder_on_an_sd_model_warns() {
    let dir = tempfile::tempdir().unwrap();
    let xl = taesd_copy(dir.path(), "taesdxl", |_| {});
    let preview = dir.path().join("p.png");
    let result = generate(
        &dir.path().join("out"),
        &[
            "--steps",
            "2",
            "--preview",
            preview.to_str().unwrap(),
            "--taesd",
            xl.to_str().unwrap(),
        ],
    );
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "{stderr}");
    assert!(stderr.contains("looks like SDXL's TAESD"), "{stderr}");
    assert!(preview.exists());
}

/// The SDXL table is used for an SDXL model: the preview of the tiny SDXL fixture equals
/// approx-cheap with SDXL's factors of its final latents.
#[test]
fn an_sdxl_model_previews_with_the_sdxl_factors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let preview = dir.path().join("p.png");
    let model = fixture("tiny-sdxl");
    let result = sdfix(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "x",
        "--seed",
        "2",
        "--steps",
        "3",
        "--sampler",
        "euler",
        "--save-latents",
        "--preview",
        preview.to_str().unwrap(),
        "--out-dir",
        out.to_str().unwrap(),
    ]);
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    let picture = read_png(&preview);
    let image = pngs(&out).remove(0);
    let latents = candle_core::safetensors::load(image.with_extension("latents.safetensors"), &Device::Cpu).unwrap()
        ["latents"]
        .unsqueeze(0)
        .unwrap();
    let (_, _, h, w) = latents.dims4().unwrap();
    assert_eq!(picture.dimensions(), (w as u32, h as u32));
    let level_gap = |factors: LatentRgb| {
        let rgb = factors
            .apply(&latents)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let expected = to_rgb8_truncated(&rgb, h * w);
        common::max_pixel_diff(picture.as_raw(), &expected)
    };
    assert!(
        level_gap(SDXL_FACTORS) <= 1,
        "SDXL factors gap {}",
        level_gap(SDXL_FACTORS)
    );
    assert!(
        level_gap(SD_FACTORS) > 1,
        "the SD table would give the same picture; the test proves nothing"
    );
}

/// What a preview costs at 512x512 (64x64 latents), against a full-size random TAESD made by
/// `scripts/make_taesd_refs.py --full-size DIR`; run by hand:
/// `SDFIX_TAESD=DIR cargo test --release --test previews -- --ignored --nocapture`.
#[test]
#[ignore]
fn preview_cost_at_512_px() {
    let Some(dir) = std::env::var_os("SDFIX_TAESD") else {
        panic!("set SDFIX_TAESD to a folder made by scripts/make_taesd_refs.py --full-size DIR");
    };
    let latents = candle_core::Tensor::randn(0f32, 1., (1, 4, 64, 64), &Device::Cpu).unwrap();
    let median_ms = |f: &dyn Fn()| {
        f();
        let mut times: Vec<f64> = (0..5)
            .map(|_| {
                let start = Instant::now();
                f();
                start.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        times.sort_by(f64::total_cmp);
        (times[2], times[0])
    };
    let (approx, approx_min) = median_ms(&|| {
        let rgb = SD_FACTORS.apply(&latents).unwrap();
        to_rgb8_truncated(&rgb.flatten_all().unwrap().to_vec1::<f32>().unwrap(), 64 * 64);
    });
    let decoder = TaesdFolder::open(Path::new(&dir))
        .unwrap()
        .load_decoder(&Device::Cpu, DType::F32)
        .unwrap();
    let (taesd, taesd_min) = median_ms(&|| {
        decoder.decode(&latents).unwrap();
    });
    println!("approx-cheap 64x64 latents: median {approx:.3} ms, min {approx_min:.3} ms");
    println!("TAESD decode 64x64 -> 512x512: median {taesd:.1} ms, min {taesd_min:.1} ms (5 runs after a warm-up)");
}
