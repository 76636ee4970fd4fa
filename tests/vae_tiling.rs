//! `--vae-tiling` against diffusers' `vae.enable_tiling()` on the tiny fixture VAE (its
//! sample_size 16 makes 8-latent-px tiles, so small tensors make several): the decoder and the
//! encoder on inputs of one tile, 2 x 2 tiles and uneven tiles, within 1e-5; `generate
//! --vae-tiling` end to end (text to image, and img2img whose encode is tiled too) against
//! diffusers' pipelines; and the setting through prompt files, PNG metadata, `--from-image` and
//! its error. References: tests/fixtures/refs/vae_tiling.*, from
//! `scripts/make_vae_tiling_refs.py`.

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use sdfix::weights::loader::{load_vae, load_vae_encoder};

use common::{assert_reference_case, fixture, max_abs_diff, pngs, reference_tensors, sdfix};

const REGENERATE: &str = "regenerate with: .venv-oracle/bin/python scripts/make_vae_tiling_refs.py";
/// The bar for the VAE alone, max abs in f32.
const TOLERANCE: f32 = 1e-5;
/// Tiling changes the picture: a tiled case that comes out this close to the whole decode was
/// not tiled.
const TILED_DIFFERS_BY: f32 = 1e-2;
/// The end-to-end bars of the other pipeline tests: final latents max abs, pixels /255.
const PIPELINE_TOLERANCES: (f32, u8) = (2e-3, 2);

fn tiny_vae_paths() -> (std::path::PathBuf, std::path::PathBuf) {
    let vae = fixture("tiny-sd/vae");
    (vae.join("config.json"), vae.join("diffusion_pytorch_model.safetensors"))
}

#[test]
fn tiled_decode_matches_diffusers_on_one_four_and_uneven_tiles() {
    let refs = reference_tensors("vae_tiling");
    let (config, weights) = tiny_vae_paths();
    let vae = load_vae(&config, &weights, DType::F32, &Device::Cpu).unwrap();
    for name in ["decode_8x8", "decode_12x12", "decode_9x13_batch2", "decode_20x13"] {
        let latents = &refs[&format!("{name}.latents")];
        let ours = vae.decode_tiled(latents).unwrap();
        let reference = &refs[&format!("{name}.images")];
        assert_eq!(ours.dims(), reference.dims(), "{name}");
        let diff = max_abs_diff(&ours, reference);
        eprintln!("{name}: max abs {diff:e}");
        assert!(diff < TOLERANCE, "{name}: differs by {diff:e}; {REGENERATE}");
        let whole = max_abs_diff(&vae.decode(latents).unwrap(), reference);
        if name == "decode_8x8" {
            // One tile: diffusers decodes it whole.
            assert!(whole < TOLERANCE, "{name}: the whole decode differs by {whole:e}");
        } else {
            assert!(whole > TILED_DIFFERS_BY, "{name}: tiled equals whole ({whole:e})");
        }
    }
}

#[test]
fn tiled_encode_matches_diffusers_on_one_four_and_uneven_tiles() {
    let refs = reference_tensors("vae_tiling");
    let (config, weights) = tiny_vae_paths();
    let encoder = load_vae_encoder(&config, &weights, DType::F32, &Device::Cpu).unwrap();
    for name in ["encode_16x16", "encode_24x24", "encode_18x34_batch2"] {
        let images = &refs[&format!("{name}.images")];
        let dist = encoder.encode_tiled(images).unwrap();
        for (what, ours) in [("mean", &dist.mean), ("std", &dist.std)] {
            let reference = &refs[&format!("{name}.{what}")];
            assert_eq!(ours.dims(), reference.dims(), "{name}.{what}");
            let diff = max_abs_diff(ours, reference);
            eprintln!("{name}.{what}: max abs {diff:e}");
            assert!(diff < TOLERANCE, "{name}.{what}: differs by {diff:e}; {REGENERATE}");
        }
        let whole = max_abs_diff(&encoder.encode(images).unwrap().mean, &refs[&format!("{name}.mean")]);
        assert_eq!(
            whole < TOLERANCE,
            name == "encode_16x16",
            "{name}: whole encode differs by {whole:e}"
        );
    }
}

#[test]
fn generate_with_vae_tiling_matches_diffusers_with_tiling_on() {
    assert_reference_case("vae_tiling", "txt2img_40x24", PIPELINE_TOLERANCES, REGENERATE);
}

#[test]
fn img2img_with_vae_tiling_encodes_and_decodes_in_tiles_as_diffusers() {
    assert_reference_case("vae_tiling", "img2img_40x24", PIPELINE_TOLERANCES, REGENERATE);
}

fn generate(dir: &Path, model: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--steps",
        "2",
        "--seed",
        "1",
        "--width",
        "40",
        "--height",
        "24",
        "--out-dir",
        dir.to_str().unwrap(),
        "-q",
    ];
    args.extend(extra);
    sdfix(&args)
}

/// `--vae-tiling` is recorded (A1111 text and JSON record), changes the picture, is repeated by
/// `--from-image`, and a prompt-file line sets it.
#[test]
fn vae_tiling_is_recorded_repeated_and_taken_from_prompt_files() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-sd");
    let run = generate(
        &dir.path().join("tiled"),
        &model,
        &["--prompt", "a cat", "--vae-tiling"],
    );
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let tiled = pngs(&dir.path().join("tiled"));
    let text = sdfix::output::png::read_png_text(&tiled[0]).unwrap();
    assert!(
        text["parameters"].contains("VAE tiling: True"),
        "{}",
        text["parameters"]
    );
    let record: serde_json::Value = serde_json::from_str(&text["sdfix"]).unwrap();
    assert_eq!(record["vae_tiling"], true, "{record}");

    let run = generate(&dir.path().join("whole"), &model, &["--prompt", "a cat"]);
    assert!(run.status.success());
    let whole = pngs(&dir.path().join("whole"));
    let text = sdfix::output::png::read_png_text(&whole[0]).unwrap();
    assert!(!text["parameters"].contains("VAE tiling"), "{}", text["parameters"]);
    assert!(!text["sdfix"].contains("vae_tiling"), "{}", text["sdfix"]);
    let pixels = |path: &Path| image::open(path).unwrap().to_rgb8().into_raw();
    assert!(pixels(&tiled[0]) != pixels(&whole[0]), "--vae-tiling changed nothing");

    let again = dir.path().join("again");
    let run = sdfix(&[
        "generate",
        "--from-image",
        tiled[0].to_str().unwrap(),
        "--out-dir",
        again.to_str().unwrap(),
        "-q",
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(
        pixels(&pngs(&again)[0]) == pixels(&tiled[0]),
        "--from-image did not tile"
    );

    let prompts = dir.path().join("p.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"a cat\", \"vae_tiling\": true}\n").unwrap();
    let from_file = dir.path().join("file");
    let run = generate(&from_file, &model, &["--prompts", prompts.to_str().unwrap()]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(
        pixels(&pngs(&from_file)[0]) == pixels(&tiled[0]),
        "the prompt file's vae_tiling"
    );
}

/// A VAE whose sample_size diffusers would tile into a picture of another size: one line naming
/// the flag, no file.
#[test]
fn a_vae_that_cannot_be_tiled_is_refused_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let source = fixture("tiny-sd");
    std::fs::create_dir_all(model.join("vae")).unwrap();
    for part in ["unet", "text_encoder", "tokenizer", "scheduler", "model_index.json"] {
        std::os::unix::fs::symlink(source.join(part), model.join(part)).unwrap();
    }
    std::os::unix::fs::symlink(
        source.join("vae/diffusion_pytorch_model.safetensors"),
        model.join("vae/diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("vae/config.json")).unwrap()).unwrap();
    config["sample_size"] = 20.into();
    std::fs::write(model.join("vae/config.json"), config.to_string()).unwrap();

    let out = dir.path().join("out");
    let run = generate(&out, &model, &["--prompt", "a cat"]);
    assert!(
        run.status.success(),
        "untiled runs: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let refused = dir.path().join("refused");
    let run = generate(&refused, &model, &["--prompt", "a cat", "--vae-tiling"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("--vae-tiling is not possible: this VAE's sample_size 20 does not tile evenly"),
        "{stderr}"
    );
    assert!(!refused.exists() || pngs(&refused).is_empty());
}
