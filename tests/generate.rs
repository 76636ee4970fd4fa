//! `sdfix generate` end to end on the tiny fixture model, against diffusers'
//! StableDiffusionPipeline given the same initial latents (tests/fixtures/refs/pipeline.*, from
//! `scripts/make_pipeline_refs.py`), plus determinism and bad-input checks. Black-box: the binary.

mod common;

use common::{fixture, max_abs_diff, pngs, reference_tensors, sdfix};

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};

const REGENERATE: &str = "regenerate with: python scripts/make_pipeline_refs.py";
/// The bars: final latents within 2e-3 max abs, PNG within 2/255.
const LATENT_TOLERANCE: f32 = 2e-3;
const PIXEL_TOLERANCE: u8 = 2;

fn refs() -> HashMap<String, Tensor> {
    reference_tensors("pipeline")
}

/// Runs one reference case through the binary; returns our final latents and images.
fn run_case(name: &str, extra: &[&str]) -> (Vec<Tensor>, Vec<image::RgbImage>) {
    common::run_reference_case("pipeline", name, extra)
}

fn assert_case_matches_diffusers(name: &str) {
    common::assert_reference_case("pipeline", name, (LATENT_TOLERANCE, PIXEL_TOLERANCE), REGENERATE);
}

#[test]
fn all_fixes_on_matches_diffusers_for_a_batch_of_two() {
    assert_case_matches_diffusers("all_fixes");
}

#[test]
fn baseline_matches_diffusers_leading_without_fixes() {
    assert_case_matches_diffusers("baseline");
}

#[test]
fn without_cfg_matches_diffusers() {
    assert_case_matches_diffusers("no_cfg");
}

#[test]
fn non_square_with_negative_prompt_matches_diffusers() {
    assert_case_matches_diffusers("non_square_negative");
}

#[test]
fn epsilon_model_without_zero_snr_matches_diffusers() {
    assert_case_matches_diffusers("epsilon_no_zero_snr");
}

/// 7 trailing steps do not divide T: we step to alpha_bar of the next listed timestep (matching a
/// reference loop built from diffusers' parts), where diffusers steps to t - T // n.
#[test]
fn seven_steps_use_the_next_timestep_not_t_minus_t_over_n() {
    assert_case_matches_diffusers("next_timestep_n7");
    let refs = refs();
    let (latents, _) = run_case("next_timestep_n7", &[]);
    let gap = max_abs_diff(&latents[0], &refs["next_timestep_n7.diffusers_final"].get(0).unwrap());
    assert!(
        gap > LATENT_TOLERANCE,
        "expected to differ from diffusers' t - T//n rule, gap {gap:e}"
    );
}

fn generate_bytes(out_dir: &Path, extra: &[&str]) -> Vec<Vec<u8>> {
    let mut args = vec!["generate", "--model"];
    let model = fixture("tiny-sd");
    let model = model.to_str().unwrap();
    args.push(model);
    args.extend([
        "--prompt",
        "a red circle",
        "--steps",
        "8",
        "--out-dir",
        out_dir.to_str().unwrap(),
    ]);
    args.extend(extra);
    let out = sdfix(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    pngs(out_dir).iter().map(|p| std::fs::read(p).unwrap()).collect()
}

#[test]
fn a_seed_gives_the_same_image_whatever_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let together = generate_bytes(
        &dir.path().join("a"),
        &["--seed", "7", "--num-images", "3", "--batch-size", "2"],
    );
    let alone = generate_bytes(&dir.path().join("b"), &["--seed", "8"]);
    assert_eq!(together.len(), 3);
    assert_eq!(together[1], alone[0], "image 1 of seed 7 is seed 8's image");
    assert_ne!(together[0], together[1]);
}

#[test]
fn eta_adds_seeded_noise() {
    let dir = tempfile::tempdir().unwrap();
    let first = generate_bytes(&dir.path().join("a"), &["--seed", "3", "--eta", "1"]);
    let again = generate_bytes(&dir.path().join("b"), &["--seed", "3", "--eta", "1"]);
    let deterministic = generate_bytes(&dir.path().join("c"), &["--seed", "3"]);
    assert_eq!(first, again);
    assert_ne!(first, deterministic);
}

/// Exit code 2, no panic, one `error:` line naming `needle`, and no image written.
fn assert_refused(extra: &[&str], needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let model = fixture("tiny-sd");
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "x",
        "--out-dir",
        out_dir.to_str().unwrap(),
    ];
    args.extend(extra);
    let out = sdfix(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{extra:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let line = stderr.lines().find(|l| l.starts_with("error:")).unwrap_or_default();
    assert!(line.contains(needle), "{extra:?}: expected {needle:?} in {stderr}");
    assert!(
        !out_dir.exists() || pngs(&out_dir).is_empty(),
        "{extra:?} wrote an image"
    );
}

#[test]
fn bad_input_is_refused_with_the_flag_named() {
    assert_refused(&["--zero-snr", "--prediction", "epsilon"], "--no-zero-snr");
    assert_refused(&["--width", "21"], "--width 21 must be a positive multiple of 2");
    assert_refused(&["--height", "0"], "--height 0");
    assert_refused(&["--steps", "1001"], "--steps 1001");
    assert_refused(&["--guidance-rescale", "1.5"], "--guidance-rescale");
    assert_refused(&["--eta", "-1"], "--eta");
    assert_refused(&["--baseline", "--spacing", "trailing"], "--baseline");
    assert_refused(&["--device", "tpu"], "--device");
    assert_refused(&["--dtype", "f8"], "--dtype");
    assert_refused(&["--dtype", "bf16", "--device", "cpu"], "--dtype bf16");
    assert_refused(&["--latents", "/no/such/file.safetensors"], "--latents");
    let out = sdfix(&["generate", "--model", "no-such-model", "--prompt", "x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: --model no-such-model"));
}

#[test]
fn bad_latents_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let wrong_name = dir.path().join("wrong-name.safetensors");
    let tensors = HashMap::from([(
        "noise".to_string(),
        Tensor::zeros((4, 8, 8), DType::F32, &Device::Cpu).unwrap(),
    )]);
    candle_core::safetensors::save(&tensors, &wrong_name).unwrap();
    assert_refused(
        &["--latents", wrong_name.to_str().unwrap()],
        "no tensor named \"latents\"",
    );

    let wrong_channels = dir.path().join("wrong-channels.safetensors");
    let tensors = HashMap::from([(
        "latents".to_string(),
        Tensor::zeros((3, 8, 8), DType::F32, &Device::Cpu).unwrap(),
    )]);
    candle_core::safetensors::save(&tensors, &wrong_channels).unwrap();
    assert_refused(&["--latents", wrong_channels.to_str().unwrap()], "3 channels");

    let three_d = dir.path().join("three-d.safetensors");
    let tensors = HashMap::from([(
        "latents".to_string(),
        Tensor::zeros((4, 8, 8), DType::F32, &Device::Cpu).unwrap(),
    )]);
    candle_core::safetensors::save(&tensors, &three_d).unwrap();
    assert_refused(
        &["--latents", three_d.to_str().unwrap(), "--num-images", "2"],
        "--num-images 2",
    );
}

#[test]
fn existing_images_are_not_overwritten_silently() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let first = generate_bytes(&out, &["--seed", "5"]);
    let model = fixture("tiny-sd");
    let args = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a red circle",
        "--steps",
        "8",
        "--seed",
        "5",
        "--out-dir",
        out.to_str().unwrap(),
    ];
    let again = sdfix(&args);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--overwrite"));
    let mut with_overwrite = args.to_vec();
    with_overwrite.push("--overwrite");
    assert!(sdfix(&with_overwrite).status.success());
    assert_eq!(
        pngs(&out).iter().map(|p| std::fs::read(p).unwrap()).collect::<Vec<_>>(),
        first
    );
}

/// Lays `tests/fixtures/tiny-sd` out as hf-hub's cache does:
/// `<HF_HOME>/hub/models--<owner>--<name>/{refs/main, snapshots/<commit>/...}`.
fn fake_hub_cache(home: &Path, repo: &str) {
    fake_hub_cache_of(home, repo, "tiny-sd");
}

/// [`fake_hub_cache`] of fixture `model`.
fn fake_hub_cache_of(home: &Path, repo: &str, model: &str) {
    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
    let repo_dir = home.join("hub").join(format!("models--{}", repo.replace('/', "--")));
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), COMMIT).unwrap();
    let snapshot = repo_dir.join("snapshots").join(COMMIT);
    let source = fixture(model);
    for entry in std::fs::read_dir(&source).unwrap() {
        let entry = entry.unwrap();
        let target = snapshot.join(entry.file_name());
        if entry.path().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            for file in std::fs::read_dir(entry.path()).unwrap() {
                let file = file.unwrap();
                std::os::unix::fs::symlink(file.path(), target.join(file.file_name())).unwrap();
            }
        } else {
            std::os::unix::fs::symlink(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn a_hub_repo_in_the_cache_runs_without_network() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("hf");
    fake_hub_cache(&home, "sdfix-test/tiny-sd");
    let out_dir = dir.path().join("out");
    let run = |offline: bool| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_sdfix"));
        command
            .args([
                "generate",
                "--model",
                "sdfix-test/tiny-sd",
                "--prompt",
                "a red circle",
                "--steps",
                "8",
            ])
            .args(["--seed", "1", "--overwrite", "--out-dir", out_dir.to_str().unwrap()])
            .env("HF_HOME", &home)
            // Any request would go to a closed local port and fail.
            .env("HF_ENDPOINT", "http://127.0.0.1:9");
        if offline {
            command.env("HF_HUB_OFFLINE", "1");
        } else {
            command.env_remove("HF_HUB_OFFLINE");
        }
        command.output().unwrap()
    };
    for offline in [true, false] {
        let out = run(offline);
        assert!(
            out.status.success(),
            "offline={offline}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Same pixels as from the folder (the metadata differs: it names the repo).
    let local_dir = dir.path().join("local");
    generate_bytes(&local_dir, &["--seed", "1"]);
    let pixels = |dir: &Path| image::open(&pngs(dir)[0]).unwrap().to_rgb8().into_raw();
    assert!(pixels(&out_dir) == pixels(&local_dir), "hub and folder runs differ");
}

/// A component saved in shards (`diffusion_pytorch_model.safetensors.index.json` and its
/// `-0000N-of-0000M` files, as diffusers saves one over its `max_shard_size`, e.g. SDXL's UNet in
/// f32) loads and draws the same bytes as the whole file.
#[test]
fn a_sharded_unet_draws_what_the_whole_file_draws() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("sharded");
    for part in ["scheduler", "text_encoder", "tokenizer", "vae"] {
        std::os::unix::fs::symlink(fixture("tiny-sd").join(part), model.join(part)).unwrap_or_else(|_| {
            std::fs::create_dir_all(&model).unwrap();
            std::os::unix::fs::symlink(fixture("tiny-sd").join(part), model.join(part)).unwrap();
        });
    }
    std::fs::copy(fixture("tiny-sd/model_index.json"), model.join("model_index.json")).unwrap();
    let unet = model.join("unet");
    std::fs::create_dir_all(&unet).unwrap();
    std::fs::copy(fixture("tiny-sd/unet/config.json"), unet.join("config.json")).unwrap();
    let tensors = candle_core::safetensors::load(
        fixture("tiny-sd/unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (k, chunk) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("diffusion_pytorch_model-0000{}-of-00002.safetensors", k + 1);
        let part: HashMap<String, Tensor> = chunk.iter().map(|n| ((*n).clone(), tensors[*n].clone())).collect();
        candle_core::safetensors::save(&part, unet.join(&file)).unwrap();
        for name in chunk {
            weight_map.insert((*name).clone(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        unet.join("diffusion_pytorch_model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let run = |model: &Path, out: &Path| {
        let out_dir = out.to_str().unwrap();
        let result = sdfix(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a red circle",
            "--steps",
            "4",
            "--seed",
            "3",
            "--out-dir",
            out_dir,
            "-q",
        ]);
        assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
        image::open(&pngs(out)[0]).unwrap().to_rgb8().into_raw()
    };
    let sharded = run(&model, &dir.path().join("a"));
    let whole = run(&fixture("tiny-sd"), &dir.path().join("b"));
    assert!(sharded == whole, "the sharded UNet drew something else");
}

/// An SDXL hub repo (text_encoder_2, tokenizer_2) runs from the cache without network, and draws
/// what its folder draws.
#[test]
fn an_sdxl_hub_repo_in_the_cache_runs_without_network() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("hf");
    fake_hub_cache_of(&home, "sdfix-test/tiny-sdxl", "tiny-sdxl");
    let run = |model: &str, out: &Path| {
        let out_dir = out.to_str().unwrap();
        let result = Command::new(env!("CARGO_BIN_EXE_sdfix"))
            .args([
                "generate",
                "--model",
                model,
                "--prompt",
                "a red circle",
                "--steps",
                "3",
                "--seed",
                "1",
            ])
            .args(["--width", "32", "--height", "32", "--out-dir", out_dir, "-q"])
            .env("HF_HOME", &home)
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .env_remove("HF_HUB_OFFLINE")
            .output()
            .unwrap();
        assert!(
            result.status.success(),
            "{model}: {}",
            String::from_utf8_lossy(&result.stderr)
        );
        image::open(&pngs(out)[0]).unwrap().to_rgb8().into_raw()
    };
    let folder = fixture("tiny-sdxl");
    assert!(
        run("sdfix-test/tiny-sdxl", &dir.path().join("hub")) == run(folder.to_str().unwrap(), &dir.path().join("dir"))
    );
}
