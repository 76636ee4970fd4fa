//! The prompt language against reference data: the parser, the chunks (on transformers' real
//! CLIP tokenizer, SD 1.x and SD 2.x padding), the emphasis formulas in numpy, and `sdfix
//! prompt` run as a user runs it. The references are tests/fixtures/refs/prompt.json and
//! prompt_encoding.safetensors, made by `.venv-oracle/bin/python scripts/make_prompt_refs.py`.

mod common;

use std::path::Path;

use sdfix::model::tokenizer::ClipTokenizer;
use sdfix::prompt::{
    apply_emphasis, chunk_fragments, parse_attention, tokenize_prompt, Emphasis, PromptChunk, DEFAULT_COMMA_BACKTRACK,
};
use serde_json::Value;

use common::{fixture, max_abs_diff, reference_tensors, sdfix};

const REGENERATE: &str = "regenerate with: .venv-oracle/bin/python scripts/make_prompt_refs.py";

fn refs() -> Value {
    let text = std::fs::read_to_string(fixture("refs/prompt.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The fixture's tokenizer as it ships (SD 2.x: pads with "!", id 0).
fn sd2_tokenizer() -> ClipTokenizer {
    ClipTokenizer::from_folder(&fixture("tiny-sd/tokenizer")).unwrap()
}

/// The same vocabulary with SD 1.x's padding (EOS), as the reference script loads it.
fn sd1_tokenizer(dir: &Path) -> ClipTokenizer {
    for file in ["vocab.json", "merges.txt"] {
        std::fs::copy(fixture(&format!("tiny-sd/tokenizer/{file}")), dir.join(file)).unwrap();
    }
    std::fs::write(
        dir.join("special_tokens_map.json"),
        r#"{"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}"#,
    )
    .unwrap();
    ClipTokenizer::from_folder(dir).unwrap()
}

#[test]
fn parser_matches_the_reference_bit_for_bit() {
    let refs = refs();
    let cases = refs["parse"].as_array().unwrap();
    assert!(cases.len() > 30);
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let ours = parse_attention(prompt).unwrap();
        let texts: Vec<&str> = case["fragments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f[0].as_str().unwrap())
            .collect();
        let bits: Vec<u64> = case["weight_bits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap())
            .collect();
        assert_eq!(
            ours.iter().map(|f| f.text.as_str()).collect::<Vec<_>>(),
            texts,
            "{prompt:?}; {REGENERATE}"
        );
        assert_eq!(
            ours.iter().map(|f| f.weight.to_bits()).collect::<Vec<_>>(),
            bits,
            "{prompt:?}: weights {:?}; {REGENERATE}",
            ours.iter().map(|f| f.weight).collect::<Vec<_>>()
        );
    }
}

fn assert_chunks_match(family: &str, tokenizer: &ClipTokenizer) {
    let refs = refs();
    for case in refs["chunks"][family].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let fragments = parse_attention(prompt).unwrap();
        let ours = chunk_fragments(&fragments, tokenizer, DEFAULT_COMMA_BACKTRACK).unwrap();
        let want = case["chunks"].as_array().unwrap();
        let short: String = prompt.chars().take(60).collect();
        assert_eq!(ours.chunks.len(), want.len(), "{family} {short:?}: chunk count");
        assert_eq!(
            ours.token_count as u64,
            case["token_count"].as_u64().unwrap(),
            "{family} {short:?}: token_count"
        );
        for (i, (chunk, want)) in ours.chunks.iter().zip(want).enumerate() {
            let ids: Vec<u32> = serde_json::from_value(want["ids"].clone()).unwrap();
            let weights: Vec<f64> = serde_json::from_value(want["weights"].clone()).unwrap();
            assert_eq!(chunk.ids, ids, "{family} {short:?}: chunk {i} ids; {REGENERATE}");
            for (ours, want) in chunk.weights.iter().zip(&weights) {
                assert!(
                    (ours - want).abs() <= 1e-12 * want.abs().max(1.0),
                    "{family} {short:?}: chunk {i} weights {:?} != {weights:?}",
                    chunk.weights
                );
            }
        }
    }
}

#[test]
fn chunks_match_the_reference_with_sd2_padding() {
    assert_chunks_match("sd2", &sd2_tokenizer());
}

#[test]
fn chunks_match_the_reference_with_sd1_padding() {
    let dir = tempfile::tempdir().unwrap();
    assert_chunks_match("sd1", &sd1_tokenizer(dir.path()));
}

#[test]
fn emphasis_formulas_match_numpy() {
    let refs = refs();
    let tensors = reference_tensors("prompt_encoding");
    let weights: Vec<f64> = serde_json::from_value(refs["formula_weights"].clone()).unwrap();
    let z = &tensors["formula.z"];
    let empty = &tensors["formula.empty"];
    for (emphasis, key) in [
        (Emphasis::Original, "formula.original"),
        (Emphasis::NoNorm, "formula.no_norm"),
        (Emphasis::Comfy, "formula.comfy"),
        (Emphasis::Ignore, "formula.z"),
    ] {
        let ours = apply_emphasis(z, &weights, emphasis, Some(empty)).unwrap();
        let err = max_abs_diff(&ours, &tensors[key]);
        assert!(err <= 1e-5, "{emphasis}: max abs error {err}; {REGENERATE}");
    }
}

/// f16 hidden states come back in f16, computed in f32 on the way.
#[test]
fn emphasis_keeps_the_dtype() {
    let tensors = reference_tensors("prompt_encoding");
    let z = tensors["formula.z"].to_dtype(candle_core::DType::F16).unwrap();
    let out = apply_emphasis(&z, &[1.2; 77], Emphasis::Original, None).unwrap();
    assert_eq!(out.dtype(), candle_core::DType::F16);
}

/// `sdfix prompt --json` prints what the library computes, in the documented shape.
#[test]
fn cli_json_shows_fragments_chunks_and_count() {
    let refs = refs();
    let case = refs["chunks"]["sd2"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["prompt"].as_str().unwrap().starts_with("masterpiece"))
        .unwrap()
        .clone();
    let prompt = case["prompt"].as_str().unwrap();
    let model = fixture("tiny-sd");
    let out = sdfix(&["prompt", "--json", "--model", model.to_str().unwrap(), prompt]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.starts_with(r#"{"fragments":"#),
        "keys in the documented order: {stdout}"
    );
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v.as_object().unwrap().len(), 3);
    assert_eq!(v["token_count"], case["token_count"]);
    let chunks = v["chunks"].as_array().unwrap();
    assert_eq!(chunks.len(), case["chunks"].as_array().unwrap().len());
    for (ours, want) in chunks.iter().zip(case["chunks"].as_array().unwrap()) {
        assert_eq!(ours["ids"], want["ids"]);
        assert_eq!(ours["tokens"].as_array().unwrap().len(), 77);
        assert_eq!(ours["weights"].as_array().unwrap().len(), 77);
    }
    assert_eq!(chunks[0]["tokens"][0], "<|startoftext|>");
    assert_eq!(chunks[0]["tokens"][1], "masterpiece</w>");
    let fragments = v["fragments"].as_array().unwrap();
    assert_eq!(fragments[0], serde_json::json!(["masterpiece, ", 1.0]));
    assert_eq!(fragments[1], serde_json::json!(["best quality", 1.2]));
}

/// With no --model, the default model's tokenizer (the built-in demo: SD 2.x padding).
#[test]
fn cli_defaults_to_the_demo_models_tokenizer() {
    let out = sdfix(&["prompt", "--json", "a (red:1.5) cat BREAK dog"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["token_count"], 76);
    assert_eq!(v["chunks"][0]["tokens"][2], "red</w>");
    assert_eq!(v["chunks"][0]["weights"][2], 1.5);
    assert_eq!(v["chunks"][1]["tokens"][1], "dog</w>");
    assert_eq!(v["chunks"][1]["ids"][3], 0, "SD 2.x pads with id 0 after the first EOS");
}

#[test]
fn cli_comfy_weights_replace_the_outer_weight() {
    let out = sdfix(&["prompt", "--json", "--emphasis", "comfy", "((a:1.3)) [b]"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["fragments"], serde_json::json!([["a", 1.3], [" [b]", 1.0]]));
}

#[test]
fn cli_table_lists_tokens_and_padding() {
    let out = sdfix(&["prompt", "a (house:1.3)"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("\"house\""), "{text}");
    assert!(text.contains("house</w>"), "{text}");
    assert!(text.contains("(padding to 77)"), "{text}");
    assert!(text.trim_end().ends_with("tokens: 2/75"), "{text}");
}

#[test]
fn cli_warns_once_about_syntax_kept_as_text() {
    let out = sdfix(&["prompt", "--json", "[cat:dog:0.5] and [red|blue] [a:b:1]"]);
    assert!(out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("prompt editing [cat:dog:0.5]") && stderr.contains("alternation [red|blue]"),
        "{stderr}"
    );
    assert!(stderr.contains("kept as literal text"), "{stderr}");
}

#[test]
fn cli_errors_name_the_problem() {
    let out = sdfix(&["prompt", "(a:1.2.3)"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error:") && stderr.contains("\"1.2.3\""), "{stderr}");
    assert!(out.stdout.is_empty());
    let out = sdfix(&["prompt", "--model", "no/such/thing/here", "a"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--model no/such/thing/here"));
}

/// `tokenize_prompt` is `parse` then `chunk_fragments` (the front door the encoder calls).
#[test]
fn tokenize_prompt_is_parse_then_chunks() {
    let tokenizer = sd2_tokenizer();
    let prompt = tokenize_prompt("a (b:1.2) BREAK c", Emphasis::Original, &tokenizer).unwrap();
    assert_eq!(prompt.chunks.len(), 2);
    // "a ", "b", "" (before the break), BREAK, "c".
    assert_eq!(prompt.fragments.len(), 5);
    let first: &PromptChunk = &prompt.chunks[0];
    assert_eq!(first.weights[2], 1.2);
}
