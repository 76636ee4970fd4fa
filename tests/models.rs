//! Golden tests: our UNet, CLIP text encoder, VAE and tokenizer against diffusers/transformers on
//! the tiny fixture models (tests/fixtures, written by `scripts/make_fixtures.py`).

mod common;

use common::{fixture, max_abs_diff};

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use sdfix::config::clip::ClipTextConfig;
use sdfix::config::read_json;
use sdfix::model::clip::ClipTextTransformer;
use sdfix::model::tokenizer::ClipTokenizer;
use sdfix::weights::loader::Weights;
use sdfix::weights::loader::{load_text_encoder, load_unet, load_vae};

const REGENERATE: &str = "regenerate with: python scripts/make_fixtures.py";
/// The bar: max |ours - reference| / max |reference| in f32.
const RELATIVE_TOLERANCE: f32 = 1e-4;

fn refs() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("refs/models.safetensors"), &Device::Cpu).expect("reference file loads")
}

/// max |a - b| / max |b|.
fn relative_error(ours: &Tensor, reference: &Tensor) -> f32 {
    assert_eq!(ours.dims(), reference.dims(), "shape");
    let diff = max_abs_diff(ours, reference);
    let scale = reference.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    diff / scale
}

fn assert_matches(ours: &Tensor, reference: &Tensor, what: &str) {
    let error = relative_error(ours, reference);
    assert!(
        error <= RELATIVE_TOLERANCE,
        "{what}: relative error {error:e} > {RELATIVE_TOLERANCE:e}; {REGENERATE}"
    );
    eprintln!("{what}: relative error {error:e}");
}

fn input_ids(refs: &HashMap<String, Tensor>) -> Tensor {
    refs["clip.input_ids"].to_dtype(DType::U32).unwrap()
}

#[test]
fn clip_matches_transformers_for_a_batch_of_two() {
    let refs = refs();
    let clip = load_text_encoder(
        &fixture("tiny-sd/text_encoder/config.json"),
        &fixture("tiny-sd/text_encoder/model.safetensors"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let out = clip.forward(&input_ids(&refs)).unwrap();
    assert_matches(&out, &refs["clip.last_hidden_state"], "clip (gelu, batch 2)");
}

/// The fixture was saved by transformers 5, which writes no `text_model.` prefix; real SD
/// checkpoints (transformers 4) have it, along with the `position_ids` buffer.
#[test]
fn clip_loads_weights_with_the_text_model_prefix_and_quick_gelu() {
    let refs = refs();
    let tensors =
        candle_core::safetensors::load(fixture("tiny-sd/text_encoder/model.safetensors"), &Device::Cpu).unwrap();
    assert!(tensors.keys().all(|k| !k.starts_with("text_model.")));
    let mut prefixed: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (format!("text_model.{k}"), v))
        .collect();
    let position_ids = Tensor::arange(0i64, 77, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    prefixed.insert("text_model.embeddings.position_ids".into(), position_ids);
    let weights = Weights::from_tensors(prefixed, "prefixed", DType::F32, &Device::Cpu);
    let config: ClipTextConfig = read_json(&fixture("tiny-unet-sd1/text_encoder_config.json")).unwrap();
    assert_eq!(config.hidden_act, "quick_gelu");
    let clip = weights.build(|vb| ClipTextTransformer::new(vb, &config)).unwrap();
    let out = clip.forward(&input_ids(&refs)).unwrap();
    assert_matches(
        &out,
        &refs["clip_quick_gelu.last_hidden_state"],
        "clip (quick_gelu, text_model. prefix)",
    );
}

#[test]
fn sd2_style_unet_matches_diffusers_at_t999_and_t1() {
    let refs = refs();
    let unet = load_unet(
        &fixture("tiny-sd/unet/config.json"),
        &fixture("tiny-sd/unet/diffusion_pytorch_model.safetensors"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let (sample, context) = (&refs["unet.sample"], &refs["unet.encoder_hidden_states"]);
    for t in [999, 1] {
        let out = unet.forward(sample, t as f64, context).unwrap();
        assert_matches(&out, &refs[&format!("unet.out_t{t}")], &format!("sd2-style unet t={t}"));
    }
}

#[test]
fn sd1_style_unet_from_pickled_bin_matches_diffusers() {
    let refs = refs();
    let unet = load_unet(
        &fixture("tiny-unet-sd1/config.json"),
        &fixture("tiny-unet-sd1/diffusion_pytorch_model.bin"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let (sample, context) = (&refs["unet.sample"], &refs["unet.encoder_hidden_states"]);
    for t in [999, 1] {
        let out = unet.forward(sample, t as f64, context).unwrap();
        assert_matches(
            &out,
            &refs[&format!("unet_sd1.out_t{t}")],
            &format!("sd1-style unet t={t}"),
        );
    }
}

#[test]
fn vae_decode_of_a_batch_of_two_matches_diffusers() {
    let refs = refs();
    let vae = load_vae(
        &fixture("tiny-sd/vae/config.json"),
        &fixture("tiny-sd/vae/diffusion_pytorch_model.safetensors"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(vae.downscale_factor(), 2);
    let out = vae.decode(&refs["vae.latents"]).unwrap();
    assert_matches(&out, &refs["vae.decoded"], "vae decode");
}

/// Checkpoints saved before diffusers 0.15 name the VAE attention query / key / value /
/// proj_attn and store them as 1x1 convolutions; they decode the same.
#[test]
fn vae_with_legacy_attention_names_decodes_the_same() {
    let refs = refs();
    let path = fixture("tiny-sd/vae/diffusion_pytorch_model.safetensors");
    let legacy: HashMap<String, Tensor> = candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(name, tensor)| {
            let renamed = [
                ("to_q", "query"),
                ("to_k", "key"),
                ("to_v", "value"),
                ("to_out.0", "proj_attn"),
            ]
            .iter()
            .find_map(|(new, old)| {
                let marker = format!(".attentions.0.{new}.");
                name.contains(&marker)
                    .then(|| name.replace(&marker, &format!(".attentions.0.{old}.")))
            });
            match renamed {
                Some(old) if tensor.rank() == 2 => {
                    let (o, i) = tensor.dims2().unwrap();
                    (old, tensor.reshape((o, i, 1, 1)).unwrap())
                }
                Some(old) => (old, tensor),
                None => (name, tensor),
            }
        })
        .collect();
    assert!(legacy.keys().any(|k| k.ends_with("attentions.0.proj_attn.weight")));
    let config: sdfix::config::vae::VaeConfig = read_json(&fixture("tiny-sd/vae/config.json")).unwrap();
    let vae = Weights::from_tensors(legacy, "legacy vae", DType::F32, &Device::Cpu)
        .build_part(sdfix::model::vae::Vae::UNREAD_PREFIXES, |vb| {
            Ok(sdfix::model::vae::Vae::new(vb, &config)?)
        })
        .unwrap();
    let out = vae.decode(&refs["vae.latents"]).unwrap();
    assert_matches(&out, &refs["vae.decoded"], "legacy-named vae decode");
}

#[derive(serde::Deserialize)]
struct TokenizerRefs {
    cases: Vec<TokenizerCase>,
}

#[derive(serde::Deserialize)]
struct TokenizerCase {
    prompt: String,
    ids: Vec<u32>,
}

#[test]
fn tokenizer_ids_equal_transformers() {
    let refs: TokenizerRefs = read_json(&fixture("refs/tokenizer.json")).unwrap();
    assert!(refs.cases.len() >= 30);
    let tokenizer = ClipTokenizer::from_folder(&fixture("tiny-sd/tokenizer")).unwrap();
    for case in &refs.cases {
        let ids = tokenizer.encode(&case.prompt).unwrap();
        assert_eq!(ids, case.ids, "prompt {:?}; {REGENERATE}", case.prompt);
    }
}

#[test]
fn long_prompts_report_their_truncation() {
    let tokenizer = ClipTokenizer::from_folder(&fixture("tiny-sd/tokenizer")).unwrap();
    assert_eq!(tokenizer.truncated_tokens("solid black background").unwrap(), 0);
    assert_eq!(tokenizer.truncated_tokens(&"cat ".repeat(80)).unwrap(), 5);
}

fn unet_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixture("tiny-sd/unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn build_unet(
    tensors: HashMap<String, Tensor>,
    config_edit: impl FnOnce(&mut serde_json::Value),
) -> anyhow::Result<()> {
    let mut config: serde_json::Value = read_json(&fixture("tiny-sd/unet/config.json")).unwrap();
    config_edit(&mut config);
    let spec = serde_json::from_value::<sdfix::config::unet::UNetConfig>(config)?.resolve()?;
    let weights = Weights::from_tensors(tensors, "unet.safetensors", DType::F32, &Device::Cpu);
    weights
        .build(|vb| Ok(sdfix::model::unet::UNet2DConditionModel::new(vb, &spec)?))
        .map(|_| ())
}

#[test]
fn a_missing_tensor_is_named_with_the_file() {
    let mut tensors = unet_tensors();
    tensors.remove("mid_block.attentions.0.proj_in.weight");
    let err = format!("{:#}", build_unet(tensors, |_| {}).unwrap_err());
    assert!(
        err.contains("unet.safetensors") && err.contains("mid_block.attentions.0.proj_in.weight"),
        "{err}"
    );
}

#[test]
fn a_shape_mismatch_is_named() {
    // Wider top level: its tensors no longer match the file.
    let err = format!(
        "{:#}",
        build_unet(unet_tensors(), |c| c["block_out_channels"] =
            serde_json::json!([24, 32, 32]))
        .unwrap_err()
    );
    assert!(
        err.contains("unet.safetensors: shape mismatch for down_blocks.0."),
        "{err}"
    );
    assert!(err.contains("expected: [24], got: [16]"), "{err}");
}

#[test]
fn unused_tensors_mean_the_config_does_not_match() {
    // The file has 2 transformer layers in down block 1; a config saying 1 would ignore one.
    let err = format!(
        "{:#}",
        build_unet(unet_tensors(), |c| c["transformer_layers_per_block"] =
            serde_json::json!(1))
        .unwrap_err()
    );
    assert!(
        err.contains("does not use") && err.contains("transformer_blocks.1"),
        "{err}"
    );
}

#[test]
fn an_unsupported_config_value_is_named() {
    let err = format!(
        "{:#}",
        build_unet(unet_tensors(), |c| c["addition_embed_type"] =
            serde_json::json!("text_time"))
        .unwrap_err()
    );
    assert!(err.contains("addition_embed_type"), "{err}");
}
