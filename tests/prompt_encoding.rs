//! A weighted prompt of three chunks through sdfix's CLIP text encoder (tiny fixture), with
//! each emphasis mode, against transformers' `CLIPTextModel` run chunk by chunk and the formulas
//! in numpy (tests/fixtures/refs/prompt_encoding.safetensors, made by
//! `.venv-oracle/bin/python scripts/make_prompt_refs.py`).
//!
//! This is the one test that reaches into the text encoder (`TextEncoder::model.forward` on one
//! chunk's ids); everything else about prompts is in tests/prompt.rs.

mod common;

use candle_core::{DType, Device, Tensor};
use sdfix::prompt::{empty_chunk, encode_chunks, tokenize_prompt, Emphasis};
use sdfix::weights::files::ModelLocation;
use sdfix::weights::loader::{self, ModelSource};

use common::{fixture, max_abs_diff, reference_tensors};

#[test]
fn weighted_chunks_match_transformers_and_the_formulas() {
    let text: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("refs/prompt.json")).unwrap()).unwrap();
    let prompt = text["encoding_prompt"].as_str().unwrap();
    let refs = reference_tensors("prompt_encoding");
    let dev = Device::Cpu;
    let source = ModelSource::open(ModelLocation::Folder(fixture("tiny-sd")), &Default::default()).unwrap();
    let configs = source.configs().unwrap();
    let encoder = loader::load_model_text_encoder(&source, &configs, DType::F32, &dev, &Default::default()).unwrap();
    let encode = |ids: &[u32]| -> anyhow::Result<Tensor> {
        let ids = Tensor::new(ids, &dev)?.unsqueeze(0)?; // (1, 77)
        Ok(encoder.model.forward(&ids)?)
    };
    let empty = encode(&empty_chunk(&encoder.tokenizer).ids).unwrap();
    assert!(max_abs_diff(&empty, &refs["encoding.empty"]) < 1e-5);
    // The encoder alone is within 1.6e-6 of transformers. `original` rescales by a ratio of two
    // chunk means that are near 0 here (-0.007, against values up to 3.9), which amplifies that
    // error: measured 7.4e-6, hence its wider bar.
    for (emphasis, key, bar) in [
        (Emphasis::Original, "encoding.original", 2e-5),
        (Emphasis::NoNorm, "encoding.no_norm", 1e-5),
        (Emphasis::Ignore, "encoding.ignore", 1e-5),
    ] {
        let tokenized = tokenize_prompt(prompt, emphasis, &encoder.tokenizer).unwrap();
        assert_eq!(tokenized.chunks.len(), 3);
        let ours = encode_chunks(&tokenized.chunks, emphasis, Some(&empty), encode).unwrap();
        assert_eq!(ours.dims(), [1, 3 * 77, 32]);
        let err = max_abs_diff(&ours, &refs[key]);
        assert!(err < bar, "{emphasis}: max abs error {err}");
    }
    // The comfy formula on A1111's weights (ComfyUI's parse weighs this prompt differently).
    let tokenized = tokenize_prompt(prompt, Emphasis::Original, &encoder.tokenizer).unwrap();
    let ours = encode_chunks(&tokenized.chunks, Emphasis::Comfy, Some(&empty), encode).unwrap();
    let err = max_abs_diff(&ours, &refs["encoding.comfy_formula"]);
    assert!(err < 1e-5, "comfy: max abs error {err}");
}
