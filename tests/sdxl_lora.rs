//! SDXL LoRA, merged at load into the UNet and both text encoders, against diffusers'
//! `load_lora_weights` + `fuse_lora` (lora_scale 0.8) on the tiny SDXL: one random rank-4 LoRA in
//! diffusers' PEFT names and in kohya's SAI-layout names (`lora_unet_input_blocks_4_1_...`,
//! `lora_te1_`, `lora_te2_`), from scripts/make_sdxl_lora_refs.py (tests/fixtures/refs/sdxl_lora.*).

mod common;

const REGENERATE: &str = "regenerate with: HF_HUB_OFFLINE=1 .venv-oracle/bin/python scripts/make_sdxl_lora_refs.py";
/// The bars: final latents within 2e-3 max abs, PNG within 2/255.
const TOLERANCES: (f32, u8) = (2e-3, 2);

#[test]
fn a_peft_lora_on_unet_and_both_text_encoders_matches_diffusers() {
    common::assert_reference_case("sdxl_lora", "peft", TOLERANCES, REGENERATE);
}

#[test]
fn a_kohya_lora_in_sai_names_matches_diffusers() {
    common::assert_reference_case("sdxl_lora", "kohya", TOLERANCES, REGENERATE);
}

/// Each text encoder's part of the LoRA counts: without the second's modules the picture moves.
#[test]
fn the_second_text_encoders_updates_are_applied() {
    let dir = tempfile::tempdir().unwrap();
    let source = common::fixture("refs/sdxl-lora-kohya.safetensors");
    let tensors = candle_core::safetensors::load(&source, &candle_core::Device::Cpu).unwrap();
    let without: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .filter(|(k, _)| !k.starts_with("lora_te2_"))
        .collect();
    let path = dir.path().join("no-te2.safetensors");
    candle_core::safetensors::save(&without, &path).unwrap();
    let refs = common::reference_tensors("sdxl_lora");
    let mut args = vec!["--seed".to_string(), "0".to_string()];
    let case = common::reference_case_args("sdxl_lora", "kohya");
    let lora = case.iter().position(|a| a == "--lora").unwrap();
    args.extend(case[..lora].iter().cloned());
    args.extend(["--lora".into(), format!("{}:0.8", path.display())]);
    let (latents, _) = common::generate_from_latents(&refs["kohya.initial"], &args);
    let gap = common::max_abs_diff(&latents[0], &refs["kohya.final"].get(0).unwrap());
    assert!(gap > 1e-2, "text_encoder_2's LoRA made no difference ({gap:e})");
}

/// A LoRA for SDXL's second text encoder on a model without one is refused before any work.
#[test]
fn a_second_text_encoder_lora_on_sd_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let lora = common::fixture("refs/sdxl-lora-kohya.safetensors");
    let result = common::sdfix(&[
        "generate",
        "--model",
        common::fixture("tiny-sd").to_str().unwrap(),
        "--prompt",
        "x",
        "--steps",
        "1",
        "--lora",
        lora.to_str().unwrap(),
        "--out-dir",
        out,
    ]);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success());
    assert!(stderr.contains("match no layer of the model's"), "{stderr}");
    assert!(common::pngs(dir.path()).is_empty());
}
