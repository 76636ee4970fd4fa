//! What `sdfix prompt --json` prints and the server's `POST /sdfix/v1/prompt` answers, made in
//! one place: A1111's token counter (`modules/ui.py` `update_token_counter`, which shows
//! `token_count/target` with the target the length of the chunks the prompt needs) with the
//! fragments and each chunk's tokens behind it.

use serde::Serialize;

use super::{PromptTokenizer, TokenizedPrompt, CHUNK_TOKENS};

/// The JSON object, its keys in this order: `{"fragments": [[text, weight], ...], "chunks":
/// [{"tokens", "ids", "weights"}, ...], "token_count": N}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PromptReport {
    /// `[text, weight]` pairs, break markers included.
    pub fragments: Vec<(String, f64)>,
    pub chunks: Vec<ChunkReport>,
    /// A1111's count ([`super::Chunks::token_count`]).
    pub token_count: usize,
}

/// One 77-id chunk: the vocabulary entry of each id, the ids, the weights.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChunkReport {
    pub tokens: Vec<String>,
    pub ids: Vec<u32>,
    pub weights: Vec<f64>,
}

impl PromptReport {
    pub fn new<T: PromptTokenizer + ?Sized>(prompt: &TokenizedPrompt, tokenizer: &T) -> Self {
        Self {
            fragments: prompt.fragments.iter().map(|f| (f.text.clone(), f.weight)).collect(),
            chunks: prompt
                .chunks
                .iter()
                .map(|c| ChunkReport {
                    tokens: c.ids.iter().map(|&id| tokenizer.token_text(id)).collect(),
                    ids: c.ids.clone(),
                    weights: c.weights.clone(),
                })
                .collect(),
            token_count: prompt.token_count,
        }
    }
}

/// The right side of A1111's counter: the tokens the prompt's chunks hold, 75 per chunk (at
/// least one chunk, so the empty prompt reads `0/75`).
pub fn counter_target(token_count: usize) -> usize {
    token_count.max(1).div_ceil(CHUNK_TOKENS) * CHUNK_TOKENS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counter_target_is_whole_chunks() {
        assert_eq!(counter_target(0), 75);
        assert_eq!(counter_target(75), 75);
        assert_eq!(counter_target(76), 150);
    }
}
