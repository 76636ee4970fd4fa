//! Single-file checkpoints, black box: the tiny fixture model as an LDM file
//! (tests/fixtures/single-file, made by scripts/make_single_file_fixtures.py and checked there with
//! diffusers' from_single_file) draws what the folder draws; every detection path prints its
//! source; .ckpt reads the same tensors and a pickle naming a code-executing global is refused;
//! convert round-trips.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::{fixture, pngs, sdfix};

const SD2_FILE: &str = "single-file/tiny-sd2.safetensors";
const REGENERATE: &str =
    "regenerate with: HF_HUB_OFFLINE=1 .venv-oracle/bin/python scripts/make_single_file_fixtures.py";

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Runs `generate` with a fixed prompt, seed and steps plus `extra`; returns (stderr, the image's
/// RGB pixels, its final-latents file bytes, its parameters text).
fn generate(model: &Path, extra: &[&str]) -> (String, Vec<u8>, Vec<u8>, String) {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let mut args = vec![
        "generate".to_string(),
        "--model".into(),
        path_str(model),
        "--prompt".into(),
        "a red circle".into(),
        "--steps".into(),
        "4".into(),
        "--seed".into(),
        "7".into(),
        "--save-latents".into(),
        "--out-dir".into(),
        path_str(&out_dir),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = sdfix(&refs);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "sdfix {args:?}: {stderr}");
    let png = pngs(&out_dir).pop().unwrap();
    let pixels = image::open(&png).unwrap().to_rgb8().into_raw();
    let latents = std::fs::read(png.with_extension("latents.safetensors")).unwrap();
    let info = sdfix(&["info", &path_str(&png)]);
    (
        stderr,
        pixels,
        latents,
        String::from_utf8_lossy(&info.stdout).into_owned(),
    )
}

/// Runs `generate` expecting failure; returns stderr.
fn refused(model: &Path, extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "x",
        "--steps",
        "1",
        "--out-dir",
    ];
    let out_dir = path_str(dir.path());
    args.push(&out_dir);
    args.extend(extra);
    let out = sdfix(&args);
    assert!(!out.status.success(), "sdfix {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The tensors of a safetensors file as raw (dtype, shape, bytes), with its metadata.
type Raw = (safetensors::Dtype, Vec<usize>, Vec<u8>);

fn read_raw(path: &Path) -> Vec<(String, Raw)> {
    let bytes = std::fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Raw)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, (view.dtype(), view.shape().to_vec(), view.data().to_vec())))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

fn write_raw(path: &Path, tensors: &[(String, Raw)], metadata: Option<HashMap<String, String>>) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(name, (dtype, shape, data))| {
            (
                name.clone(),
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, metadata, path).unwrap();
}

/// The SD 2.x fixture with `extra` tensors added and `metadata`, written to `dir/name`.
fn variant(dir: &Path, name: &str, extra: &[&str], metadata: Option<HashMap<String, String>>) -> PathBuf {
    let mut tensors = read_raw(&fixture(SD2_FILE));
    for key in extra {
        tensors.push((key.to_string(), (safetensors::Dtype::F32, vec![0], Vec::new())));
    }
    let path = dir.join(name);
    write_raw(&path, &tensors, metadata);
    path
}

/// tiny-sd's configs and tokenizer without its scheduler config: the file's own marks decide.
fn configs_without_scheduler(dir: &Path) -> PathBuf {
    let configs = dir.join("configs");
    for part in ["unet/config.json", "vae/config.json", "text_encoder/config.json"] {
        let to = configs.join(part);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(fixture("tiny-sd").join(part), to).unwrap();
    }
    configs
}

#[test]
fn the_single_file_draws_what_the_folder_draws() {
    let (_, folder_pixels, folder_latents, _) = generate(&fixture("tiny-sd"), &[]);
    let config = path_str(&fixture("tiny-sd"));
    let (stderr, pixels, latents, info) = generate(&fixture(SD2_FILE), &["--config", &config]);
    assert_eq!(pixels, folder_pixels, "{REGENERATE}");
    assert_eq!(latents, folder_latents, "final latents differ; {REGENERATE}");
    assert!(stderr.contains("SD 2.x checkpoint"), "{stderr}");
    // The PNGs differ only in the model they record: the file's name and A1111's short hash.
    let digest = sdfix::weights::hash::sha256(&fixture(SD2_FILE)).unwrap();
    assert!(
        info.contains(&format!("Model hash: {}, Model: tiny-sd2,", &digest[..10])),
        "{info}"
    );
}

#[test]
fn sd1_layout_with_and_without_text_model_draws_the_same() {
    let (_, _, folder_latents, _) = generate(&fixture("tiny-sd"), &[]);
    let dir = tempfile::tempdir().unwrap();
    let body: Vec<(String, Raw)> = read_raw(&fixture(SD2_FILE))
        .into_iter()
        .filter(|(name, _)| !name.starts_with("cond_stage_model."))
        .collect();
    let clip = read_raw(&fixture("tiny-sd/text_encoder/model.safetensors"));
    let config = path_str(&fixture("tiny-sd"));
    for level in ["text_model.", ""] {
        let mut tensors = body.clone();
        tensors.extend(
            clip.iter()
                .map(|(name, raw)| (format!("cond_stage_model.transformer.{level}{name}"), raw.clone())),
        );
        let path = dir.path().join(format!("sd1{}.safetensors", level.len()));
        write_raw(&path, &tensors, None);
        let (stderr, _, latents, _) = generate(&path, &["--config", &config]);
        assert!(stderr.contains("SD 1.x checkpoint"), "{stderr}");
        assert_eq!(latents, folder_latents, "CLIP-L keys with {level:?}");
    }
}

#[test]
fn v_pred_and_ztsnr_keys_are_read_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = variant(dir.path(), "marked.safetensors", &["v_pred", "ztsnr"], None);
    let configs = configs_without_scheduler(dir.path());
    let (stderr, _, _, info) = generate(&file, &["--config", &path_str(&configs)]);
    assert!(
        stderr.contains("v-prediction and zero terminal SNR: from the checkpoint's v_pred and ztsnr keys"),
        "{stderr}"
    );
    assert!(
        info.contains("Noise Schedule: Zero Terminal SNR, Prediction: v_prediction"),
        "{info}"
    );
}

#[test]
fn modelspec_metadata_is_read_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let metadata = HashMap::from([("modelspec.prediction_type".to_string(), "v".to_string())]);
    let file = variant(dir.path(), "spec.safetensors", &[], Some(metadata));
    let configs = configs_without_scheduler(dir.path());
    let (stderr, _, _, _) = generate(&file, &["--config", &path_str(&configs)]);
    assert!(
        stderr.contains(
            "v-prediction: from the safetensors metadata modelspec.prediction_type; no zero terminal SNR: from the default (no ztsnr mark)"
        ),
        "{stderr}"
    );
}

#[test]
fn a_sidecar_yaml_is_read_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    std::fs::copy(fixture(SD2_FILE), &file).unwrap();
    std::fs::write(
        dir.path().join("model.yaml"),
        "model:\n  params:\n    parameterization: \"v\"\n    rescale_betas_zero_snr: true\n",
    )
    .unwrap();
    let configs = configs_without_scheduler(dir.path());
    let (stderr, _, _, _) = generate(&file, &["--config", &path_str(&configs)]);
    assert!(
        stderr.contains("v-prediction and zero terminal SNR: from the sidecar model.yaml"),
        "{stderr}"
    );
}

#[test]
fn flags_win_over_the_files_marks() {
    let dir = tempfile::tempdir().unwrap();
    let file = variant(dir.path(), "marked.safetensors", &["v_pred", "ztsnr"], None);
    let configs = configs_without_scheduler(dir.path());
    let (stderr, _, _, info) = generate(
        &file,
        &[
            "--config",
            &path_str(&configs),
            "--prediction",
            "epsilon",
            "--no-zero-snr",
        ],
    );
    assert!(
        stderr.contains("epsilon prediction: from --prediction; no zero terminal SNR: from --no-zero-snr"),
        "{stderr}"
    );
    assert!(info.contains("Noise Schedule: Default, Prediction: epsilon"), "{info}");
}

#[test]
fn unmarked_sd2_files_take_the_unet_output_test() {
    let dir = tempfile::tempdir().unwrap();
    let configs = configs_without_scheduler(dir.path());
    let (stderr, _, _, _) = generate(&fixture(SD2_FILE), &["--config", &path_str(&configs)]);
    assert!(
        stderr.contains("from the UNet-output test at t = 999 (AUTOMATIC1111's, for unmarked SD 2.x files)"),
        "{stderr}"
    );
}

#[test]
fn config_dir_scheduler_is_a_source_too() {
    let (stderr, _, _, _) = generate(&fixture(SD2_FILE), &["--config", &path_str(&fixture("tiny-sd"))]);
    assert!(
        stderr.contains(&format!(
            "v-prediction and zero terminal SNR: from --config {}",
            fixture("tiny-sd").display()
        )),
        "{stderr}"
    );
}

#[test]
fn unknown_keys_are_listed_with_verbose() {
    let (stderr, _, _, _) = generate(&fixture(SD2_FILE), &["--config", &path_str(&fixture("tiny-sd")), "-v"]);
    assert!(
        stderr.contains("1 checkpoint key(s) no rule reads (ignored): extra.unknown_key"),
        "{stderr}"
    );
}

#[test]
fn a_ckpt_holds_the_same_tensors_in_f16_and_draws() {
    use sdfix::weights::single_file::{read_component, SingleFile, SingleFileOptions};
    let options = SingleFileOptions {
        config_dir: Some(fixture("tiny-sd")),
        ..Default::default()
    };
    let ckpt = SingleFile::open(&fixture("single-file/tiny-sd2-f16.ckpt"), &options).unwrap();
    let safetensors = SingleFile::open(&fixture(SD2_FILE), &options).unwrap();
    let device = candle_core::Device::Cpu;
    for (ours, theirs) in [
        (&ckpt.unet, &safetensors.unet),
        (&ckpt.vae, &safetensors.vae),
        (&ckpt.text_encoder, &safetensors.text_encoder),
    ] {
        assert_eq!(ours.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>());
        let ours = read_component(&ckpt, ours, &device).unwrap();
        let theirs = read_component(&safetensors, theirs, &device).unwrap();
        for (name, tensor) in &ours {
            let expected = theirs[name].to_dtype(candle_core::DType::F16).unwrap();
            assert_eq!(tensor.dtype(), candle_core::DType::F16, "{name}");
            let same = tensor
                .eq(&expected)
                .unwrap()
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .min_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(same, 1.0, "{name} differs");
        }
    }
    let config = path_str(&fixture("tiny-sd"));
    let (stderr, _, _, _) = generate(&fixture("single-file/tiny-sd2-f16.ckpt"), &["--config", &config]);
    assert!(stderr.contains("SD 2.x checkpoint"), "{stderr}");
}

/// A zip checkpoint whose data.pkl calls os.system: refused before anything is read.
#[test]
fn a_pickle_naming_a_code_executing_global_is_refused() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evil.ckpt");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", options).unwrap();
    // PROTO 2; GLOBAL os system; BINUNICODE "touch pwned"; TUPLE1; REDUCE; STOP
    let mut program = vec![0x80, 2];
    program.extend(b"cos\nsystem\n");
    program.extend([b'X', 11, 0, 0, 0]);
    program.extend(b"touch pwned");
    program.extend([0x85, b'R', b'.']);
    zip.write_all(&program).unwrap();
    zip.finish().unwrap();
    let stderr = refused(&path, &[]);
    assert!(
        stderr.contains("refused") && stderr.contains("global os.system is not allowed"),
        "{stderr}"
    );
}

#[test]
fn sdxl_and_incomplete_files_are_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let sdxl = dir.path().join("xl.safetensors");
    let one = |name: &str| (name.to_string(), (safetensors::Dtype::F32, vec![1], vec![0u8; 4]));
    write_raw(
        &sdxl,
        &[
            one("model.diffusion_model.label_emb.0.0.weight"),
            one("conditioner.embedders.0.transformer.x"),
        ],
        None,
    );
    let stderr = refused(&sdxl, &[]);
    assert!(
        stderr.contains("SDXL checkpoint without both text encoders"),
        "{stderr}"
    );

    // A consumed key missing: the error names the tensor.
    let mut tensors = read_raw(&fixture(SD2_FILE));
    tensors.retain(|(name, _)| name != "model.diffusion_model.out.2.weight");
    let broken = dir.path().join("broken.safetensors");
    write_raw(&broken, &tensors, None);
    let stderr = refused(&broken, &["--config", &path_str(&fixture("tiny-sd"))]);
    assert!(stderr.contains("conv_out.weight"), "{stderr}");

    // Sizes SD's defaults do not fit: the error says to pass --config.
    let stderr = refused(&fixture(SD2_FILE), &[]);
    assert!(stderr.contains("pass --config DIR"), "{stderr}");
}

#[test]
fn convert_writes_a_folder_that_draws_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("converted");
    let result = sdfix(&[
        "convert",
        &path_str(&fixture(SD2_FILE)),
        "--out",
        &path_str(&out),
        "--config",
        &path_str(&fixture("tiny-sd")),
    ]);
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    for part in [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ] {
        assert!(out.join(part).is_file(), "{part}");
    }
    let (_, pixels, latents, _) = generate(&out, &[]);
    let (_, file_pixels, file_latents, _) = generate(&fixture(SD2_FILE), &["--config", &path_str(&fixture("tiny-sd"))]);
    assert_eq!(pixels, file_pixels);
    assert_eq!(latents, file_latents);
    // A second convert into the same folder is refused; f16 is half the size.
    let again = sdfix(&["convert", &path_str(&fixture(SD2_FILE)), "--out", &path_str(&out)]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));
    let half = dir.path().join("half");
    let result = sdfix(&[
        "convert",
        &path_str(&fixture(SD2_FILE)),
        "--out",
        &path_str(&half),
        "--config",
        &path_str(&fixture("tiny-sd")),
        "--dtype",
        "f16",
    ]);
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    let size = |p: &Path| {
        std::fs::metadata(p.join("unet/diffusion_pytorch_model.safetensors"))
            .unwrap()
            .len()
    };
    assert!((size(&half) as f64) < 0.6 * size(&out) as f64);
}

#[test]
fn the_model_hash_is_cached() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("copy.safetensors");
    std::fs::copy(fixture(SD2_FILE), &file).unwrap();
    let cache = dir.path().join("cache");
    let run = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sdfix"))
            .env("SDFIX_CACHE", &cache)
            .args([
                "generate",
                "--model",
                file.to_str().unwrap(),
                "--config",
                fixture("tiny-sd").to_str().unwrap(),
                "--prompt",
                "x",
                "--steps",
                "1",
                "--overwrite",
                "--out-dir",
                dir.path().join("out").to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(run().contains("hashed"));
    assert!(!run().contains("hashed"), "the second run should use the cached hash");
}

/// A safetensors file with `keys`' names and shapes whose data is a hole (a sparse file: gigabytes
/// of f16 zeros that cost no disk and no time), for what needs shapes only.
fn sparse_file(path: &Path, keys: &[(String, Vec<usize>)]) {
    use std::io::Write;
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in keys {
        let bytes = shape.iter().product::<usize>() * 2;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut text = serde_json::to_vec(&header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut file = std::fs::File::create(path).unwrap();
    file.write_all(&(text.len() as u64).to_le_bytes()).unwrap();
    file.write_all(&text).unwrap();
    file.set_len(8 + text.len() as u64 + offset as u64).unwrap();
}

/// SD 1.5's and SD 2.1's LDM keys and shapes (tests/fixtures/single-file/arch_keys.json, from
/// diffusers' models of models/arch's configs): the synthesised configs are models/arch's.
#[test]
fn configs_synthesised_from_real_shapes_are_sds() {
    use sdfix::weights::single_file::{SingleFile, SingleFileOptions};
    let text = std::fs::read_to_string(fixture("single-file/arch_keys.json")).unwrap();
    let listing: serde_json::Value = serde_json::from_str(&text).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (arch, prediction, family) in [("sd1.5", "epsilon", "SD 1.x"), ("sd2.1", "v_prediction", "SD 2.x")] {
        let keys: Vec<(String, Vec<usize>)> = serde_json::from_value(listing["archs"][arch].clone()).unwrap();
        let path = dir.path().join(format!("{arch}.safetensors"));
        sparse_file(&path, &keys);
        let options = SingleFileOptions {
            prediction: Some(prediction.into()),
            ..Default::default()
        };
        let single = SingleFile::open(&path, &options).unwrap();
        assert_eq!(single.family.name(), family);
        assert!(single.leftover.is_empty(), "{arch}: {:?}", single.leftover);
        let arch_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/arch").join(arch);
        let read = |part: &str| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(arch_dir.join(part)).unwrap()).unwrap()
        };
        let unet = read("unet/config.json");
        for key in [
            "block_out_channels",
            "layers_per_block",
            "attention_head_dim",
            "cross_attention_dim",
            "use_linear_projection",
            "in_channels",
            "out_channels",
            "down_block_types",
            "up_block_types",
            "sample_size",
        ] {
            // A key the public config leaves out has diffusers' default (false for the booleans).
            let expected = if unet[key].is_null() {
                serde_json::json!(false)
            } else {
                unet[key].clone()
            };
            assert_eq!(single.configs.unet[key], expected, "{arch} unet {key}");
        }
        let upcast = unet
            .get("upcast_attention")
            .cloned()
            .unwrap_or(serde_json::json!(false));
        assert_eq!(
            single.configs.unet["upcast_attention"], upcast,
            "{arch} upcast_attention"
        );
        let vae = read("vae/config.json");
        for key in [
            "block_out_channels",
            "layers_per_block",
            "latent_channels",
            "sample_size",
        ] {
            assert_eq!(single.configs.vae[key], vae[key], "{arch} vae {key}");
        }
        let text_encoder = read("text_encoder/config.json");
        for key in [
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "hidden_act",
            "max_position_embeddings",
        ] {
            assert_eq!(single.configs.text_encoder[key], text_encoder[key], "{arch} text {key}");
        }
        // The configs resolve as the engine will.
        sdfix::weights::loader::ModelConfigs::from_single_file(&single).unwrap();
    }
}

/// A 9-channel UNet (SD inpainting) is recognised and named; `generate` without a picture and a
/// mask says what it needs.
#[test]
fn an_inpainting_unet_is_named() {
    let text = std::fs::read_to_string(fixture("single-file/arch_keys.json")).unwrap();
    let listing: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut keys: Vec<(String, Vec<usize>)> = serde_json::from_value(listing["archs"]["sd1.5"].clone()).unwrap();
    for (name, shape) in &mut keys {
        if name == "model.diffusion_model.input_blocks.0.0.weight" {
            shape[1] = 9;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inpainting.safetensors");
    sparse_file(&path, &keys);
    let options = sdfix::weights::single_file::SingleFileOptions {
        prediction: Some("epsilon".into()),
        ..Default::default()
    };
    let single = sdfix::weights::single_file::SingleFile::open(&path, &options).unwrap();
    assert_eq!(single.configs.unet["in_channels"], 9);
    assert!(
        single
            .describe()
            .iter()
            .any(|l| l == "the UNet takes 9 channels: an inpainting model"),
        "{:?}",
        single.describe()
    );
    let stderr = refused(&path, &["--prediction", "epsilon"]);
    assert!(stderr.contains("give --init-image and --mask"), "{stderr}");
}

/// diffusers' own from_single_file pipeline on the same file, from the same initial latents
/// (tests/fixtures/single-file/pipeline.safetensors): final latents within the 2e-3.
#[test]
fn the_single_file_matches_diffusers_from_single_file() {
    let device = candle_core::Device::Cpu;
    let refs = candle_core::safetensors::load(fixture("single-file/pipeline.safetensors"), &device).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let latents_file = dir.path().join("initial.safetensors");
    let initial = HashMap::from([("latents".to_string(), refs["initial"].clone())]);
    candle_core::safetensors::save(&initial, &latents_file).unwrap();
    let out_dir = dir.path().join("out");
    let out = sdfix(&[
        "generate",
        "--model",
        &path_str(&fixture(SD2_FILE)),
        "--config",
        &path_str(&fixture("tiny-sd")),
        "--prompt",
        "a blue square",
        "--steps",
        "10",
        "--latents",
        &path_str(&latents_file),
        "--save-latents",
        "--out-dir",
        &path_str(&out_dir),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let png = pngs(&out_dir).pop().unwrap();
    let ours =
        candle_core::safetensors::load(png.with_extension("latents.safetensors"), &device).unwrap()["latents"].clone();
    let diff = common::max_abs_diff(&ours, &refs["final"].get(0).unwrap());
    eprintln!("final latents within {diff:e} of diffusers' from_single_file pipeline");
    assert!(diff < 2e-3, "{diff:e}; {REGENERATE}");
}

#[test]
fn ema_weights_replace_the_unets_with_ema() {
    let dir = tempfile::tempdir().unwrap();
    let config = path_str(&fixture("tiny-sd"));
    let mut tensors = read_raw(&fixture(SD2_FILE));
    let unet: Vec<(String, Raw)> = tensors
        .iter()
        .filter_map(|(name, raw)| {
            let rest = name.strip_prefix("model.diffusion_model.")?;
            Some((
                format!("model_ema.diffusion_model{}", rest.replace('.', "")),
                raw.clone(),
            ))
        })
        .collect();
    tensors.extend(unet);
    // The EMA copy differs from the weights in one tensor: the output convolution's bias.
    for (name, (_, _, data)) in &mut tensors {
        if name == "model_ema.diffusion_modelout2bias" {
            data.iter_mut().for_each(|b| *b = 0);
        }
    }
    let path = dir.path().join("ema.safetensors");
    write_raw(&path, &tensors, None);
    let (_, _, plain, _) = generate(&path, &["--config", &config]);
    let (_, _, folder, _) = generate(&fixture("tiny-sd"), &[]);
    assert_eq!(plain, folder, "without --ema the EMA copy is ignored");
    let (_, _, ema, _) = generate(&path, &["--config", &config, "--ema"]);
    assert_ne!(ema, plain, "--ema reads the EMA copy");
    let stderr = refused(&fixture(SD2_FILE), &["--config", &config, "--ema"]);
    assert!(stderr.contains("has no EMA weights"), "{stderr}");
}

/// The built-in tokenizer pads as each family's own: SD 1.x with <|endoftext|>, SD 2.x with "!".
#[test]
fn the_built_in_tokenizer_pads_per_family() {
    use sdfix::model::tokenizer::ClipTokenizer;
    use sdfix::weights::demo::clip_tokenizer_folder;
    const EOS: u32 = 49407;
    for (sd1, pad) in [(true, EOS), (false, 0)] {
        let tokenizer = ClipTokenizer::from_folder(&clip_tokenizer_folder(sd1).unwrap()).unwrap();
        let ids = tokenizer.encode("a cat").unwrap();
        assert_eq!(ids.len(), 77);
        assert_eq!(ids[3], EOS, "sd1 {sd1}: {ids:?}");
        assert_eq!(ids[76], pad, "sd1 {sd1}");
    }
}

/// img2img reads the VAE encoder from the single file (first_stage_model.encoder.*) as from the
/// folder's VAE.
#[test]
fn img2img_on_the_single_file_equals_the_folder() {
    let init = path_str(&fixture("refs/img2img_init_16x16.png"));
    let img2img = ["--init-image", init.as_str(), "--strength", "0.6"];
    let (_, folder_pixels, folder_latents, _) = generate(&fixture("tiny-sd"), &img2img);
    let config = path_str(&fixture("tiny-sd"));
    let mut extra = img2img.to_vec();
    extra.extend(["--config", config.as_str()]);
    let (_, pixels, latents, _) = generate(&fixture(SD2_FILE), &extra);
    assert_eq!(latents, folder_latents);
    assert_eq!(pixels, folder_pixels);
}
