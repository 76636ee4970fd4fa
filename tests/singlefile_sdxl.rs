//! SDXL single files in the SAI layout (`conditioner.embedders.{0,1}`, `label_emb`), black box:
//! `sdfix convert` writes the tiny SDXL folder as one file (checked against diffusers'
//! `from_single_file` by scripts/make_sdxl_single_file.py, whose report is
//! tests/fixtures/single-file/sdxl.json), which then draws what the folder draws with no
//! prediction or zero-SNR flag (its `v_pred` and `ztsnr` keys say so), and converts back to the
//! folder's tensors exactly (diffusers' `from_pretrained` on that folder too). The tiny file is
//! written at test time rather than committed: it would be 22 MB, its text encoders' 49408-token
//! embeddings.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::{fixture, pngs, sdfix};

const REGENERATE: &str = "regenerate with: HF_HUB_OFFLINE=1 .venv-oracle/bin/python scripts/make_sdxl_single_file.py";

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// `sdfix convert tiny-sdxl --out dir/name` with `extra`; returns the file.
fn write_single_file(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let file = dir.join(name);
    let mut args = vec![
        "convert".to_string(),
        path_str(&fixture("tiny-sdxl")),
        "--out".into(),
        path_str(&file),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = sdfix(&refs);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    file
}

/// tiny-sdxl's configs and tokenizers without its scheduler config (its heads are not SDXL's 64
/// channels each, so it needs --config): the file's own marks decide.
fn configs_without_scheduler(dir: &Path) -> PathBuf {
    let configs = dir.join("configs");
    for part in [
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "text_encoder_2/config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer_2/vocab.json",
        "tokenizer_2/merges.txt",
        "tokenizer_2/special_tokens_map.json",
        "tokenizer_2/tokenizer_config.json",
    ] {
        let to = configs.join(part);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(fixture("tiny-sdxl").join(part), to).unwrap();
    }
    configs
}

/// `generate` with a fixed prompt, seed and steps plus `extra`; returns (stderr, RGB pixels,
/// final-latents file bytes).
fn generate(model: &Path, extra: &[&str]) -> (String, Vec<u8>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let mut args = vec![
        "generate".to_string(),
        "--model".into(),
        path_str(model),
        "--prompt".into(),
        "a red circle".into(),
        "--negative-prompt".into(),
        "blue".into(),
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
    (stderr, pixels, latents)
}

#[test]
fn the_sai_file_draws_what_the_folder_draws_with_no_prediction_flags() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_single_file(dir.path(), "tiny-sdxl.safetensors", &[]);
    let configs = configs_without_scheduler(dir.path());
    let (_, folder_pixels, folder_latents) = generate(&fixture("tiny-sdxl"), &[]);
    let (stderr, pixels, latents) = generate(&file, &["--config", &path_str(&configs)]);
    assert_eq!(pixels, folder_pixels);
    assert_eq!(latents, folder_latents, "final latents differ");
    assert!(stderr.contains("SDXL checkpoint, configs --config"), "{stderr}");
    assert!(
        stderr.contains("v-prediction and zero terminal SNR: from the checkpoint's v_pred and ztsnr keys"),
        "{stderr}"
    );
}

#[test]
fn unmarked_sdxl_files_are_epsilon_and_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_single_file(dir.path(), "plain.safetensors", &["--no-marks"]);
    let configs = configs_without_scheduler(dir.path());
    let (stderr, pixels, _) = generate(&file, &["--config", &path_str(&configs)]);
    assert!(
        stderr.contains("epsilon prediction: from the SDXL default (no mark in or beside the file)"),
        "{stderr}"
    );
    // The flags that the marks stand for give the marked file's picture back.
    let (_, folder_pixels, _) = generate(&fixture("tiny-sdxl"), &[]);
    assert_ne!(pixels, folder_pixels);
    let flags = [
        "--config",
        &path_str(&configs),
        "--prediction",
        "v_prediction",
        "--zero-snr",
    ];
    let (stderr, pixels, _) = generate(&file, &flags);
    assert_eq!(pixels, folder_pixels);
    assert!(stderr.contains("from --prediction"), "{stderr}");

    // A sidecar yaml, as AUTOMATIC1111 reads it.
    std::fs::write(
        dir.path().join("plain.yaml"),
        "model:\n  params:\n    parameterization: \"v\"\n    zero_terminal_snr: true\n",
    )
    .unwrap();
    let (stderr, pixels, _) = generate(&file, &["--config", &path_str(&configs)]);
    assert_eq!(pixels, folder_pixels);
    assert!(
        stderr.contains("v-prediction and zero terminal SNR: from the sidecar plain.yaml"),
        "{stderr}"
    );
}

#[test]
fn convert_round_trips_the_folders_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_single_file(dir.path(), "tiny-sdxl.safetensors", &[]);
    let back = dir.path().join("back");
    let out = sdfix(&[
        "convert",
        &path_str(&file),
        "--out",
        &path_str(&back),
        "--config",
        &path_str(&fixture("tiny-sdxl")),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let device = candle_core::Device::Cpu;
    for part in [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
    ] {
        let theirs = candle_core::safetensors::load(fixture("tiny-sdxl").join(part), &device).unwrap();
        let ours = candle_core::safetensors::load(back.join(part), &device).unwrap();
        // transformers 5 saves CLIP without its `text_model.` level; convert writes it.
        let bare = |m: HashMap<String, candle_core::Tensor>| -> HashMap<String, candle_core::Tensor> {
            m.into_iter()
                .filter(|(k, _)| !k.ends_with("position_ids"))
                .map(|(k, v)| (k.strip_prefix("text_model.").unwrap_or(&k).to_string(), v))
                .collect()
        };
        let (theirs, ours) = (bare(theirs), bare(ours));
        let mut names: Vec<&String> = theirs.keys().collect();
        names.sort();
        let mut our_names: Vec<&String> = ours.keys().collect();
        our_names.sort();
        assert_eq!(our_names, names, "{part}");
        for (name, tensor) in &theirs {
            assert_eq!(tensor.shape(), ours[name].shape(), "{part}: {name}");
            assert_eq!(common::max_abs_diff(tensor, &ours[name]), 0.0, "{part}: {name}");
        }
    }
    for part in [
        "model_index.json",
        "tokenizer_2/vocab.json",
        "text_encoder_2/config.json",
    ] {
        assert!(back.join(part).is_file(), "{part}");
    }
    // An existing --out file is refused, as is a folder that is not SDXL, and a single file.
    let twice = sdfix(&[
        "convert",
        &path_str(&file),
        "--out",
        &path_str(&dir.path().join("x.safetensors")),
    ]);
    assert!(String::from_utf8_lossy(&twice.stderr).contains("is already a single file"));
    let again = sdfix(&["convert", &path_str(&fixture("tiny-sdxl")), "--out", &path_str(&file)]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists"));
    let sd = dir.path().join("sd.safetensors");
    let refused = sdfix(&["convert", &path_str(&fixture("tiny-sd")), "--out", &path_str(&sd)]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("is not an SDXL model"));
}

#[test]
fn diffusers_loaded_the_written_file_to_the_folders_weights() {
    let text = std::fs::read_to_string(fixture("single-file/sdxl.json")).unwrap();
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(report["marks"], serde_json::json!(["v_pred", "ztsnr"]), "{REGENERATE}");
    for part in ["unet", "vae", "text_encoder", "text_encoder_2"] {
        let component = &report["components"][part];
        assert_eq!(component["max_abs_diff"], 0.0, "{part}: {REGENERATE}");
        // The file converted back to a folder by sdfix, loaded by diffusers' from_pretrained.
        assert_eq!(component["converted_back_max_abs_diff"], 0.0, "{part}: {REGENERATE}");
        assert_eq!(component["unmatched"], serde_json::json!([]), "{part}: {REGENERATE}");
    }
}

/// SDXL LoRAs (kohya SAI names, PEFT names) merge into the single file as into the folder.
#[test]
fn loras_on_the_single_file_equal_the_folders() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_single_file(dir.path(), "tiny-sdxl.safetensors", &[]);
    let configs = configs_without_scheduler(dir.path());
    for name in ["kohya", "peft"] {
        let lora = format!(
            "{}:0.8",
            path_str(&fixture(&format!("refs/sdxl-lora-{name}.safetensors")))
        );
        let (_, folder_pixels, folder_latents) = generate(&fixture("tiny-sdxl"), &["--lora", &lora]);
        let (_, pixels, latents) = generate(&file, &["--config", &path_str(&configs), "--lora", &lora]);
        assert_eq!(pixels, folder_pixels, "{name}");
        assert_eq!(latents, folder_latents, "{name}");
    }
}

/// A safetensors file with `keys`' names and shapes whose data is a hole (a sparse file), for
/// what needs shapes only.
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

/// SDXL base 1.0's tensors (tests/fixtures/single-file/sdxl_arch_keys.json, diffusers names from
/// its published configs) under their SAI names, as a real SDXL file has them.
fn sdxl_base_sai_keys(listing: &serde_json::Value) -> Vec<(String, Vec<usize>)> {
    use sdfix::weights::ldm_write::{vae_ldm_name, UNetBlocks};
    let part =
        |name: &str| -> Vec<(String, Vec<usize>)> { serde_json::from_value(listing["keys"][name].clone()).unwrap() };
    let mut keys = Vec::new();
    let unet = part("unet");
    let blocks = UNetBlocks::from_names(unet.iter().map(|(n, _)| n.as_str()));
    for (name, shape) in unet {
        keys.push((
            format!("model.diffusion_model.{}", blocks.ldm_name(&name).unwrap()),
            shape,
        ));
    }
    let vae = part("vae");
    for (name, shape) in vae {
        let ldm = vae_ldm_name(&name, 4).unwrap();
        let shape = if ldm.contains("mid.attn_1.") && shape.len() == 2 {
            vec![shape[0], shape[1], 1, 1]
        } else {
            shape
        };
        keys.push((format!("first_stage_model.{ldm}"), shape));
    }
    for (name, shape) in part("text_encoder") {
        let bare = name.strip_prefix("text_model.").unwrap_or(&name).to_string();
        keys.push((format!("conditioner.embedders.0.transformer.text_model.{bare}"), shape));
    }
    // OpenCLIP's names: q/k/v fused, the projection stored [width, projection].
    let prefix = "conditioner.embedders.1.model.";
    let mut fused = std::collections::BTreeSet::new();
    for (name, shape) in part("text_encoder_2") {
        let bare = name.strip_prefix("text_model.").unwrap_or(&name).to_string();
        let ldm = match bare.as_str() {
            "embeddings.token_embedding.weight" => "token_embedding.weight".to_string(),
            "embeddings.position_embedding.weight" => "positional_embedding".to_string(),
            "text_projection.weight" => {
                keys.push((format!("{prefix}text_projection"), vec![shape[1], shape[0]]));
                continue;
            }
            other if other.starts_with("final_layer_norm.") => other.replace("final_layer_norm.", "ln_final."),
            other => {
                let rest = other.strip_prefix("encoder.layers.").unwrap();
                let (n, tail) = rest.split_once('.').unwrap();
                if let Some(kind) = ["q_proj.", "k_proj.", "v_proj."]
                    .iter()
                    .find_map(|p| tail.strip_prefix(&format!("self_attn.{p}")))
                {
                    if fused.insert((n.to_string(), kind.to_string())) {
                        let mut shape = shape.clone();
                        shape[0] *= 3;
                        keys.push((format!("{prefix}transformer.resblocks.{n}.attn.in_proj_{kind}"), shape));
                    }
                    continue;
                }
                let tail = tail
                    .replace("layer_norm1.", "ln_1.")
                    .replace("layer_norm2.", "ln_2.")
                    .replace("mlp.fc1.", "mlp.c_fc.")
                    .replace("mlp.fc2.", "mlp.c_proj.")
                    .replace("self_attn.out_proj.", "attn.out_proj.");
                format!("transformer.resblocks.{n}.{tail}")
            }
        };
        keys.push((format!("{prefix}{ldm}"), shape));
    }
    keys.push(("v_pred".into(), vec![0]));
    keys.push(("ztsnr".into(), vec![0]));
    keys
}

/// A file with SDXL base's shapes needs no --config: the synthesised configs are SDXL base's, and
/// resolve as the engine will (text widths 768 + 1280 = 2048, pooled 2816 - 6 x 256 = 1280).
#[test]
fn configs_synthesised_from_sdxl_base_shapes_are_sdxls() {
    use sdfix::weights::single_file::{SingleFile, SingleFileOptions};
    let text = std::fs::read_to_string(fixture("single-file/sdxl_arch_keys.json")).unwrap();
    let listing: serde_json::Value = serde_json::from_str(&text).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sdxl-base.safetensors");
    sparse_file(&path, &sdxl_base_sai_keys(&listing));
    let single = SingleFile::open(&path, &SingleFileOptions::default()).unwrap();
    assert_eq!(single.family.name(), "SDXL");
    assert!(single.leftover.is_empty(), "{:?}", single.leftover);
    assert_eq!(
        single.detection.describe(),
        "v-prediction and zero terminal SNR: from the checkpoint's v_pred and ztsnr keys"
    );
    let expected = &listing["configs"];
    for (part, ours) in [
        ("unet", &single.configs.unet),
        ("vae", &single.configs.vae),
        ("text_encoder", &single.configs.text_encoder),
        ("text_encoder_2", &single.configs.text_encoder_2),
    ] {
        for (key, value) in expected[part].as_object().unwrap() {
            if matches!(key.as_str(), "bos_token_id" | "eos_token_id" | "layer_norm_eps") {
                continue;
            }
            assert_eq!(&ours[key], value, "{part} {key}");
        }
    }
    assert_eq!(
        single.configs.text_encoder_2["architectures"],
        serde_json::json!(["CLIPTextModelWithProjection"])
    );
    let configs = sdfix::weights::loader::ModelConfigs::from_single_file(&single).unwrap();
    assert!(configs.text_encoder_2.is_some());
}
