//! A1111's prompt language, as pure functions: emphasis and `BREAK` parsed into weighted
//! fragments ([`parse`]), fragments tokenized into 77-id chunks with A1111's comma backtrack
//! ([`chunks`]), and the weights applied to any text encoder's hidden states, chunk by chunk
//! ([`emphasis`]); prompt editing, alternation and `AND` found so a front end can say they are
//! kept as text ([`unsupported`]).
//!
//! Wiring it into a text encoder: [`tokenize_prompt`], then [`encode_chunks`] with a closure
//! that runs the encoder on one chunk's 77 ids; for `--emphasis comfy` and `--pad-conds`, encode
//! [`empty_chunk`] once and pass it. [`PromptReport`] is what a token counter shows.

pub mod chunks;
pub mod emphasis;
pub mod parse;
pub mod report;
pub mod unsupported;

use anyhow::Result;

pub use chunks::{
    chunk_fragments, empty_chunk, Chunks, PromptChunk, PromptTokenizer, CHUNK_IDS, CHUNK_TOKENS,
    DEFAULT_COMMA_BACKTRACK,
};
pub use emphasis::{apply_emphasis, encode_chunks, pad_to_same_length, Emphasis};
pub use parse::{parse_attention, parse_comfy, Fragment};
pub use report::{counter_target, ChunkReport, PromptReport};
pub use unsupported::{find_unsupported, unsupported_warning, Unsupported, UnsupportedSyntax};

/// A prompt as the text encoder will see it.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedPrompt {
    /// The parse: text and weight, break markers included.
    pub fragments: Vec<Fragment>,
    pub chunks: Vec<PromptChunk>,
    /// A1111's token count ([`Chunks::token_count`]).
    pub token_count: usize,
}

/// Parses `prompt` as `emphasis` reads it and builds its chunks with A1111's default comma
/// backtrack (A1111's `tokenize_line`).
pub fn tokenize_prompt<T: PromptTokenizer + ?Sized>(
    prompt: &str,
    emphasis: Emphasis,
    tokenizer: &T,
) -> Result<TokenizedPrompt> {
    let fragments = emphasis.fragments(prompt)?;
    let Chunks { chunks, token_count } = chunk_fragments(&fragments, tokenizer, DEFAULT_COMMA_BACKTRACK)?;
    Ok(TokenizedPrompt {
        fragments,
        chunks,
        token_count,
    })
}
