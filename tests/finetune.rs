//! `sdfix finetune`: the training path's forward against the inference path, one training step
//! against PyTorch + diffusers (scripts/make_finetune_refs.py), resume equal to an uninterrupted
//! run, and the CLI's output folder loading in `generate`.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};
use common::{fixture, reference_tensors, sdfix};
use sdfix::training::adamw::{clip_grad_norm, AdamW, AdamWConfig};
use sdfix::training::data::DataSource;
use sdfix::training::trainer::gradients;
use sdfix::training::{Batch, FinetuneSpec, Networks, Outcome, TrainEvent, Trainer};
use sdfix::weights::files::{ModelFiles, ModelLocation};
use sdfix::weights::loader::{self, ModelConfigs};

/// Gradients below this are zero up to rounding (see the key biases below).
const ZERO_GRADIENT: f32 = 1e-6;
/// Elements whose gradient is at least this share of its tensor's largest are compared after
/// the AdamW step from our own gradients.
const WELL_CONDITIONED: f32 = 1e-2;
const REGENERATE: &str = "regenerate with: /work/main/.venv-oracle/bin/python scripts/make_finetune_refs.py";

fn tiny() -> (ModelFiles, ModelConfigs) {
    let files = ModelFiles::new(ModelLocation::Folder(fixture("tiny-sd"))).unwrap();
    let configs = ModelConfigs::read(&files).unwrap();
    (files, configs)
}

/// max |a - b| / max |b|: the error relative to the tensor's scale.
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    common::max_abs_diff(a, b) / scale.max(f32::MIN_POSITIVE)
}

/// The networks built from `Var`s (the differentiable path: candle ops throughout) compute what
/// the inference path (our CPU kernels) computes, for the UNet and the text encoder.
#[test]
fn training_path_forward_equals_inference() {
    let (files, configs) = tiny();
    let dev = Device::Cpu;
    let nets = Networks::load(&files, &configs, true, &dev).unwrap();
    let unet_file = loader::component_weight_file(&files, "unet", DType::F32).unwrap();
    let inference_unet = loader::build_unet(&configs.unet, &unet_file, DType::F32, &dev).unwrap();
    let source = loader::ModelSource::Layout(tiny().0);
    let text = loader::load_model_text_encoder(&source, &configs, DType::F32, &dev, &Default::default()).unwrap();

    let captions = vec!["a red circle".to_string(), String::new()];
    let context = nets.context(&captions).unwrap().context;
    let inference_context = text.encode(&["a red circle", ""]).unwrap();
    assert!(
        context.track_op(),
        "the trained text encoder's output carries a gradient"
    );
    assert!(rel_diff(&context, &inference_context) < 1e-5);

    let sample = Tensor::randn(0f32, 1., (2, 4, 8, 8), &dev).unwrap();
    let conditioning = sdfix::model::unet::Conditioning::text(context.clone());
    let ours = nets
        .unet
        .forward_timesteps(&sample, &[999.0, 10.0], &conditioning)
        .unwrap();
    let detached = context.detach();
    let fast: Vec<Tensor> = [(0, 999.0), (1, 10.0)]
        .iter()
        .map(|&(i, t)| {
            inference_unet
                .forward(&sample.narrow(0, i, 1).unwrap(), t, &detached.narrow(0, i, 1).unwrap())
                .unwrap()
        })
        .collect();
    let fast = Tensor::cat(&fast, 0).unwrap();
    assert!(ours.track_op());
    assert!(!fast.track_op());
    assert!(rel_diff(&ours, &fast) < 1e-5, "{}", rel_diff(&ours, &fast));
}

/// One fine-tuning step (UNet and text encoder) against diffusers' train_text_to_image recipe
/// with the paper's settings: the loss within 1e-5 relative, every gradient within 1e-4 of its
/// tensor's scale, the weights after clipping and one AdamW step within 1e-6.
#[test]
fn one_training_step_matches_diffusers() {
    let refs = reference_tensors("finetune");
    let meta: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(fixture("refs/finetune.json")).unwrap()).unwrap();
    let (files, configs) = tiny();
    let dev = Device::Cpu;
    let nets = Networks::load(&files, &configs, true, &dev).unwrap();
    let captions: Vec<String> = serde_json::from_value(meta["captions"].clone()).unwrap();
    let timesteps: Vec<usize> = refs["timesteps"]
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&t| t as usize)
        .collect();
    assert_eq!(timesteps[0], 999, "the batch includes t = T - 1");
    let batch = Batch {
        latents: refs["latents"].clone(),
        noise: refs["noise"].clone(),
        timesteps,
        captions,
    };
    let loss = nets.loss(&batch).unwrap();
    let expected = refs["loss"].to_vec1::<f32>().unwrap()[0];
    let got = loss.to_scalar::<f32>().unwrap();
    assert!(
        ((got - expected) / expected).abs() < 1e-5,
        "loss {got} vs {expected}; {REGENERATE}"
    );

    let (names, params) = nets.params();
    let mut grads = gradients(&loss, &params).unwrap();
    let rows = refs["token_rows"].to_dtype(DType::U32).unwrap();
    let stored = |name: &str, t: &Tensor| -> Tensor {
        if name.ends_with("token_embedding.weight") {
            t.index_select(&rows, 0).unwrap()
        } else {
            t.clone()
        }
    };
    assert_eq!(names.len(), 420, "UNet and text encoder parameters");
    for (name, grad) in names.iter().zip(&grads) {
        let grad = grad.as_ref().unwrap_or_else(|| panic!("{name} has no gradient"));
        let reference = &refs[&format!("grad.{name}")];
        let scale = reference.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        if scale < ZERO_GRADIENT {
            // Key biases: softmax ignores a shift shared by all keys, so their gradient is 0 up
            // to rounding, in both implementations; relative error means nothing there.
            let err = common::max_abs_diff(&stored(name, grad), reference);
            assert!(err < ZERO_GRADIENT, "gradient of {name}: {err}; {REGENERATE}");
            continue;
        }
        let err = rel_diff(&stored(name, grad), reference);
        assert!(err < 1e-4, "gradient of {name}: {err} relative; {REGENERATE}");
    }

    let lr = meta["lr"].as_f64().unwrap();
    let config = AdamWConfig {
        weight_decay: meta["weight_decay"].as_f64().unwrap(),
        ..Default::default()
    };
    let norm = clip_grad_norm(&mut grads, meta["max_grad_norm"].as_f64().unwrap()).unwrap();
    let expected_norm = refs["grad_norm"].to_vec1::<f32>().unwrap()[0] as f64;
    assert!(
        (norm / expected_norm - 1.0).abs() < 1e-5,
        "grad norm {norm} vs {expected_norm}"
    );
    let coefficient = (meta["max_grad_norm"].as_f64().unwrap() / (expected_norm + 1e-6)).min(1.0);
    let before: Vec<Tensor> = params.iter().map(|p| p.as_tensor().copy().unwrap()).collect();

    // The optimizer alone: AdamW from diffusers' own (clipped) gradients lands on its weights.
    let reference_grads: Vec<Option<Tensor>> = names
        .iter()
        .zip(&grads)
        .map(|(name, ours)| {
            let reference = &refs[&format!("grad.{name}")];
            Some(if name.ends_with("token_embedding.weight") {
                // Rows the captions do not use have no gradient: zero, as ours.
                let full = ours.as_ref().unwrap().zeros_like().unwrap();
                full.index_add(&rows, &(reference * coefficient).unwrap(), 0).unwrap()
            } else {
                (reference * coefficient).unwrap()
            })
        })
        .collect();
    AdamW::new(&params, config)
        .unwrap()
        .step(&params, &reference_grads, lr)
        .unwrap();
    for (name, param) in names.iter().zip(&params) {
        let err = common::max_abs_diff(&stored(name, param.as_tensor()), &refs[&format!("after.{name}")]);
        assert!(
            err < 1e-6,
            "{name} after AdamW from diffusers' gradients: {err}; {REGENERATE}"
        );
    }

    // The whole step from our gradients. Adam's first step moves a weight by lr * g / (|g| +
    // eps): where a gradient is tiny next to its tensor's scale, its (relative-to-scale) rounding
    // is amplified, so those elements are left to the check above.
    for (param, before) in params.iter().zip(&before) {
        param.set(before).unwrap();
    }
    AdamW::new(&params, config).unwrap().step(&params, &grads, lr).unwrap();
    for ((name, param), before) in names.iter().zip(&params).zip(&before) {
        let after = stored(name, param.as_tensor());
        let reference_grad = reference_grads[names.iter().position(|n| n == name).unwrap()]
            .as_ref()
            .unwrap();
        let reference_grad = stored(name, reference_grad).abs().unwrap();
        let scale = reference_grad.max_all().unwrap().to_scalar::<f32>().unwrap();
        if scale < ZERO_GRADIENT {
            // A gradient that is 0 up to rounding (the key biases, above): Adam's first step
            // moves each weight by about +-lr in the direction of its rounding noise, in either
            // implementation; the check above pinned the optimizer on diffusers' gradients.
            continue;
        }
        let well_conditioned = reference_grad
            .ge(scale * WELL_CONDITIONED)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let diff = (&after - &refs[&format!("after.{name}")]).unwrap().abs().unwrap();
        let err = (diff * well_conditioned)
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(err < 1e-6, "{name} after one AdamW step: {err}; {REGENERATE}");
        assert!(common::max_abs_diff(param.as_tensor(), before) > 0.0, "{name} moved");
    }
}

/// A folder of 6 solid-colour 16x16 images with captions.
fn tiny_data(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    for (i, (name, rgb)) in [("black", [0u8; 3]), ("white", [255; 3]), ("red", [220, 20, 20])]
        .iter()
        .cycle()
        .take(6)
        .enumerate()
    {
        image::RgbImage::from_pixel(20, 16, image::Rgb(*rgb))
            .save(dir.join(format!("{i}.png")))
            .unwrap();
        fs::write(dir.join(format!("{i}.txt")), format!("solid {name} background\n")).unwrap();
    }
}

fn spec(data: &Path, out: &Path, resume: bool) -> FinetuneSpec {
    FinetuneSpec {
        data: DataSource::Folder(data.to_path_buf()),
        out: out.to_path_buf(),
        steps: 4,
        batch_size: 2,
        lr: 1e-3,
        warmup_steps: 2,
        grad_accum: 2,
        ema_decay: Some(0.9),
        seed: 7,
        size: Some(16),
        train_text_encoder: false,
        resume,
        save_every: None,
        max_grad_norm: Some(1.0),
        caption_dropout: 0.1,
        adamw: AdamWConfig::default(),
    }
}

fn run_to_end(spec: FinetuneSpec, stop_after: Option<usize>) -> Outcome {
    let (files, configs) = tiny();
    let stop = AtomicBool::new(false);
    let mut trainer = Trainer::new(spec, files, &configs, &Device::Cpu, &mut |_| {}).unwrap();
    trainer
        .run(&stop, &mut |event| {
            if let (TrainEvent::Step { step, .. }, Some(k)) = (&event, stop_after) {
                if *step == k {
                    stop.store(true, Ordering::SeqCst);
                }
            }
        })
        .unwrap()
}

/// A run stopped at step 2 (as Ctrl-C stops it: a checkpoint, then exit) and resumed ends with
/// exactly the weights, EMA and log of the uninterrupted run (grad accumulation, EMA, warm-up
/// and caption dropout all on).
#[test]
fn resume_after_interrupt_equals_uninterrupted() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    tiny_data(&data);
    let (whole, split) = (tmp.path().join("whole"), tmp.path().join("split"));
    assert_eq!(run_to_end(spec(&data, &whole, false), None), Outcome::Finished);
    assert_eq!(run_to_end(spec(&data, &split, false), Some(2)), Outcome::Interrupted(2));
    assert!(split
        .join("checkpoints/step-000002/state/optimizer.safetensors")
        .is_file());
    assert_eq!(run_to_end(spec(&data, &split, true), None), Outcome::Finished);
    let read = |dir: &Path, file: &str| fs::read(dir.join(file)).unwrap();
    for file in [
        "unet/diffusion_pytorch_model.safetensors",
        "checkpoints/step-000004/state/weights.safetensors",
        "checkpoints/step-000004/state/optimizer.safetensors",
        "train_log.jsonl",
    ] {
        assert!(read(&whole, file) == read(&split, file), "{file} differs after resume");
    }
    // Starting afresh over a run is refused.
    let (files, configs) = tiny();
    let err = Trainer::new(spec(&data, &whole, false), files, &configs, &Device::Cpu, &mut |_| {})
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("--resume"), "{err:#}");
}

/// Every file under `dir`, by relative path, with its bytes.
fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for entry in fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                out.push((path.strip_prefix(dir).unwrap().to_path_buf(), fs::read(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// The output folder links the source model's unchanged files. Continuing a finished run
/// (`--resume` with more steps) writes that folder again: it must replace the links, not write
/// through them. (It once truncated the source model's configs and VAE to 0 bytes.)
#[test]
fn continuing_a_finished_run_leaves_the_source_model_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    tiny_data(&data);
    let source = tmp.path().join("source");
    for (relative, bytes) in tree(&fixture("tiny-sd")) {
        fs::create_dir_all(source.join(&relative).parent().unwrap()).unwrap();
        fs::write(source.join(&relative), bytes).unwrap();
    }
    let before = tree(&source);
    let out = tmp.path().join("out");
    let run = |steps: &str, resume: bool| {
        let mut args = vec![
            "finetune",
            "--model",
            source.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--steps",
            steps,
            "--batch-size",
            "2",
            "--size",
            "16",
            "--quiet",
        ];
        if resume {
            args.push("--resume");
        }
        let result = sdfix(&args);
        assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    };
    run("2", false);
    run("3", true);
    assert!(tree(&source) == before, "the source model changed");
    for config in ["unet/config.json", "vae/config.json", "text_encoder/config.json"] {
        let text = fs::read_to_string(out.join(config)).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap_or_else(|e| panic!("{config}: {e}"));
    }
}

/// The command line: a short run writes a diffusers-layout folder with the paper's scheduler
/// settings that `generate` loads, checkpoints, and a train_log.jsonl line per step.
#[test]
fn cli_finetune_writes_a_model_generate_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    tiny_data(&data);
    let out = tmp.path().join("model");
    let model = fixture("tiny-sd");
    let run = sdfix(&[
        "finetune",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--save-every",
        "2",
        "--train-text-encoder",
        // A value flag: it once clashed with the single-file loader's `--ema` switch.
        "--ema",
        "0.9",
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join("scheduler/scheduler_config.json")).unwrap()).unwrap();
    assert_eq!(config["rescale_betas_zero_snr"], true);
    assert_eq!(config["prediction_type"], "v_prediction");
    assert_eq!(config["timestep_spacing"], "trailing");
    assert!(out.join("text_encoder/model.safetensors").is_file());
    assert!(out
        .join("checkpoints/step-000002/model/unet/diffusion_pytorch_model.safetensors")
        .is_file());
    assert_eq!(
        fs::read_to_string(out.join("train_log.jsonl")).unwrap().lines().count(),
        3
    );
    let images = tmp.path().join("images");
    let generate = sdfix(&[
        "generate",
        "--model",
        out.to_str().unwrap(),
        "--prompt",
        "solid black background",
        "--steps",
        "3",
        "--width",
        "16",
        "--height",
        "16",
        "--out-dir",
        images.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(
        generate.status.success(),
        "{}",
        String::from_utf8_lossy(&generate.stderr)
    );
    assert_eq!(common::pngs(&images).len(), 1);
}

/// Ctrl-C (SIGINT) during training saves a checkpoint and exits cleanly; `--resume` picks it up.
#[test]
fn ctrl_c_saves_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    tiny_data(&data);
    let out = tmp.path().join("model");
    let model = fixture("tiny-sd");
    let args = |resume: bool| {
        let mut args = vec![
            "finetune".to_string(),
            "--model".into(),
            model.to_str().unwrap().into(),
            "--data".into(),
            data.to_str().unwrap().into(),
            "--out".into(),
            out.to_str().unwrap().into(),
            "--steps".into(),
            if resume { "1" } else { "100000" }.into(),
            "--batch-size".into(),
            "2".into(),
        ];
        if resume {
            args.push("--resume".into());
        }
        args
    };
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_sdfix"))
        .args(args(false))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let log = out.join("train_log.jsonl");
    let started = std::time::Instant::now();
    while fs::read_to_string(&log).map(|t| t.lines().count()).unwrap_or(0) < 2 {
        assert!(started.elapsed().as_secs() < 120, "no training steps logged");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("interrupted at step"), "{stderr}");
    let checkpoints: Vec<_> = fs::read_dir(out.join("checkpoints")).unwrap().collect();
    assert_eq!(checkpoints.len(), 1, "one checkpoint, none partial");
    // Resuming a run that is already past --steps 1 saves the model at once.
    let resumed = sdfix(&args(true).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    assert!(out.join("unet/diffusion_pytorch_model.safetensors").is_file());
}

/// SDXL: one step of the paper's objective with the text encoders frozen and the add embedding
/// fed the pooled text and uncropped-picture micro-conditioning: loss within 1e-5 relative and
/// the UNet's gradients (the add embedding's and a sample) within 1e-4 of their scale, against
/// diffusers (scripts/make_sdxl_refs.py --finetune).
#[test]
fn one_sdxl_training_step_matches_diffusers() {
    let refs = reference_tensors("sdxl_finetune");
    let files = ModelFiles::new(ModelLocation::Folder(fixture("tiny-sdxl"))).unwrap();
    let configs = ModelConfigs::read(&files).unwrap();
    let nets = Networks::load(&files, &configs, false, &Device::Cpu).unwrap();
    let timesteps: Vec<usize> = refs["timesteps"]
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&t| t as usize)
        .collect();
    let batch = Batch {
        latents: refs["latents"].clone(),
        noise: refs["noise"].clone(),
        timesteps,
        captions: vec!["a red circle".into(), "solid black background".into()],
    };
    let loss = nets.loss(&batch).unwrap();
    let expected = refs["loss"].to_vec1::<f32>().unwrap()[0];
    let got = loss.to_scalar::<f32>().unwrap();
    assert!(((got - expected) / expected).abs() < 1e-5, "loss {got} vs {expected}");
    let (names, params) = nets.params();
    let grads = gradients(&loss, &params).unwrap();
    let mut compared = 0;
    for (name, grad) in names.iter().zip(&grads) {
        let Some(reference) = refs.get(&format!("grad.{}", name.trim_start_matches("unet/"))) else {
            continue;
        };
        let err = rel_diff(grad.as_ref().unwrap(), reference);
        assert!(err < 1e-4, "gradient of {name}: {err} relative");
        compared += 1;
    }
    assert!(compared >= 20, "only {compared} gradients compared");
    assert!(
        Networks::load(&files, &configs, true, &Device::Cpu).is_err(),
        "SDXL's text encoders are frozen"
    );
}

/// `sdfix finetune` on the tiny SDXL writes a folder (both text encoders and tokenizers with it)
/// that `generate` loads as SDXL.
#[test]
fn cli_finetune_of_an_sdxl_writes_an_sdxl_generate_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    tiny_data(&data);
    let out = tmp.path().join("model");
    let model = fixture("tiny-sdxl");
    let run = sdfix(&[
        "finetune",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--size",
        "16",
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    for part in [
        "text_encoder_2/config.json",
        "tokenizer_2/vocab.json",
        "model_index.json",
    ] {
        assert!(out.join(part).is_file(), "{part} missing");
    }
    let images = tmp.path().join("images");
    let generate = sdfix(&[
        "generate",
        "--model",
        out.to_str().unwrap(),
        "--prompt",
        "solid black background",
        "--steps",
        "3",
        "--width",
        "16",
        "--height",
        "16",
        "--out-dir",
        images.to_str().unwrap(),
    ]);
    assert!(
        generate.status.success(),
        "{}",
        String::from_utf8_lossy(&generate.stderr)
    );
    assert_eq!(common::pngs(&images).len(), 1);
}
