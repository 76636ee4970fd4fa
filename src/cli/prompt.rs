//! `sdfix prompt TEXT`: what the text encoder will see, like A1111's token counter: the
//! emphasis fragments with their weights, and each 77-id chunk's tokens, ids and weights. Only
//! the model's tokenizer is read.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::model::tokenizer::ClipTokenizer;
use crate::prompt::{
    counter_target, tokenize_prompt, unsupported_warning, Emphasis, PromptChunk, PromptReport, PromptTokenizer,
};
use crate::weights::demo::DEFAULT_MODEL;
use crate::weights::files::{with_model_context, ModelLocation};
use crate::weights::loader::ModelSource;
use crate::weights::single_file::SingleFileOptions;

#[derive(Debug, Args)]
pub struct PromptCommandArgs {
    /// The prompt, in A1111's syntax: (word), (word:1.3), [word], \( for a literal bracket,
    /// BREAK to start a new 75-token chunk.
    pub text: String,

    /// Whose tokenizer: what `generate --model` takes (a diffusers folder, a single-file
    /// checkpoint, a Hugging Face repo id, demo or demo-flawed).
    #[arg(long, value_name = "DIR|FILE|REPO|demo", default_value = DEFAULT_MODEL)]
    pub model: String,

    /// Hub revision (branch, tag or commit) of --model.
    #[arg(long)]
    pub revision: Option<String>,

    /// For a single-file --model: a diffusers folder whose tokenizer/ to use instead of the
    /// built-in CLIP tokenizer of the file's family.
    #[arg(long, value_name = "DIR")]
    pub config: Option<PathBuf>,

    /// How weights are read: original, no-norm and ignore parse as A1111 does; comfy as ComfyUI
    /// does (an inner (x:w) replaces the outer weight, [x] is text).
    #[arg(long, default_value_t = Emphasis::Original)]
    pub emphasis: Emphasis,

    /// Print one JSON object: {"fragments": [[text, weight], ...], "chunks": [{"tokens",
    /// "ids", "weights"}, ...], "token_count": N}.
    #[arg(long)]
    pub json: bool,
}

fn load_tokenizer(args: &PromptCommandArgs) -> Result<ClipTokenizer> {
    let options = SingleFileOptions {
        config_dir: args.config.clone(),
        ..SingleFileOptions::default()
    };
    let location = ModelLocation::parse(&args.model, args.revision.as_deref())?;
    ModelSource::open(location, &options)
        .and_then(|source| source.tokenizer())
        .map_err(|err| with_model_context(err, &args.model))
}

pub fn run(args: &PromptCommandArgs) -> Result<()> {
    let tokenizer = load_tokenizer(args)?;
    if let Some(warning) = unsupported_warning(&args.text) {
        eprintln!("warning: {warning}");
    }
    let prompt = tokenize_prompt(&args.text, args.emphasis, &tokenizer)?;
    let texts = |chunk: &PromptChunk| -> Vec<String> { chunk.ids.iter().map(|&id| tokenizer.token_text(id)).collect() };
    let mut out = std::io::stdout().lock();
    if args.json {
        let report = PromptReport::new(&prompt, &tokenizer);
        writeln!(out, "{}", serde_json::to_string(&report)?)?;
        return Ok(());
    }
    writeln!(out, "fragments (weight, text):")?;
    for fragment in &prompt.fragments {
        if fragment.is_break() {
            writeln!(out, "  {:>8}  BREAK (starts a new chunk)", "")?;
        } else {
            writeln!(out, "  {:>8}  {:?}", short(fragment.weight), fragment.text)?;
        }
    }
    let count = prompt.chunks.len();
    for (i, chunk) in prompt.chunks.iter().enumerate() {
        writeln!(out, "chunk {} of {count} (position, id, token, weight):", i + 1)?;
        write_chunk(&mut out, chunk, &texts(chunk), tokenizer.eos_id())?;
    }
    // A1111's counter: the count, and the length the chunks it needs hold.
    writeln!(
        out,
        "tokens: {}/{}",
        prompt.token_count,
        counter_target(prompt.token_count)
    )?;
    Ok(())
}

/// The chunk's lines up to its first EOS, then the padding as one line.
fn write_chunk(out: &mut impl std::io::Write, chunk: &PromptChunk, texts: &[String], eos: u32) -> Result<()> {
    let shown = chunk
        .ids
        .iter()
        .position(|&id| id == eos)
        .map_or(chunk.ids.len(), |i| i + 1);
    let rest = &chunk.ids[shown..];
    let one_padding_id = rest.first().filter(|&&first| rest.iter().all(|&id| id == first));
    let listed = if one_padding_id.is_some() {
        shown
    } else {
        chunk.ids.len()
    };
    for (position, ((id, text), weight)) in chunk.ids.iter().zip(texts).zip(&chunk.weights).take(listed).enumerate() {
        writeln!(out, "  {position:>5}  {id:>6}  {text:<24} {}", short(*weight))?;
    }
    if let Some(id) = one_padding_id {
        writeln!(
            out,
            "  {:>5}  {id:>6}  {:<24} 1  (padding to {})",
            format!("{shown}-{}", chunk.ids.len() - 1),
            texts[shown],
            chunk.ids.len()
        )?;
    }
    Ok(())
}

/// A weight for reading: at most 4 decimals, no trailing zeros (the JSON has every digit).
fn short(weight: f64) -> String {
    let text = format!("{weight:.4}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" {
        "0".into()
    } else {
        text.into()
    }
}
