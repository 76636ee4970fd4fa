//! Weighted fragments to CLIP chunks of 77 ids, as A1111's `sd_hijack_clip.py`
//! `FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line` builds them.
//!
//! - Each fragment is tokenized on its own (`tokenize(texts, add_special_tokens=False)`), so
//!   token boundaries fall at emphasis edges; every token takes its fragment's weight.
//! - A chunk holds 75 tokens. When a chunk is full and the next token is no comma, and the last
//!   comma sits at most `comma_backtrack` (A1111's "Prompt word wrap length limit", default 20)
//!   tokens before the end, the tokens after that comma move to the next chunk.
//! - A `BREAK` marker ends the chunk at once; a leading one makes an all-padding chunk, a
//!   trailing one none (the last chunk is made only if it has tokens, or if there is no chunk).
//! - `next_chunk` pads to 75 with EOS (weight 1) and wraps `[BOS] + 75 + [EOS]`. Tokenizers whose
//!   pad token is not EOS (SD 2.x, OpenCLIP: `!`, id 0) then get the pad id after the first EOS,
//!   as A1111's `process_tokens` does with `id_pad`.
//!
//! Textual-inversion embeddings, which `tokenize_line` also places, are not supported.

use anyhow::Result;

use super::parse::Fragment;

/// Tokens of prompt text per chunk (A1111's `chunk_length`).
pub const CHUNK_TOKENS: usize = 75;
/// Ids per chunk: BOS, the 75 tokens, EOS (CLIP's context length).
pub const CHUNK_IDS: usize = CHUNK_TOKENS + 2;
/// A1111's default `comma_padding_backtrack` ("Prompt word wrap length limit"); 0 turns the
/// backtrack off.
pub const DEFAULT_COMMA_BACKTRACK: usize = 20;
/// The vocabulary entry A1111 looks commas up by (`vocab.get(',</w>')`).
pub const COMMA_TOKEN: &str = ",</w>";

/// What chunk building needs from a CLIP tokenizer; `model::tokenizer::ClipTokenizer` has it.
pub trait PromptTokenizer {
    /// The BPE ids of `text`, without BOS, EOS or padding, never truncated.
    fn token_ids(&self, text: &str) -> Result<Vec<u32>>;
    fn bos_id(&self) -> u32;
    fn eos_id(&self) -> u32;
    /// The id that follows the first EOS: EOS itself for SD 1.x, `!` (0) for SD 2.x.
    fn pad_id(&self) -> u32;
    /// The id of [`COMMA_TOKEN`], if the vocabulary has one.
    fn comma_id(&self) -> Option<u32>;
    /// The vocabulary entry of `id`, for display (`house</w>`, `<|endoftext|>`).
    fn token_text(&self, id: u32) -> String;
}

/// One chunk as the text encoder takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptChunk {
    /// [`CHUNK_IDS`] ids: BOS, tokens, EOS padding, EOS, with the pad id after the first EOS.
    pub ids: Vec<u32>,
    /// One weight per id, 1.0 at BOS, EOS and padding (A1111's `multipliers`, in f64 as Python
    /// keeps them; cast to f32 only when multiplied into hidden states).
    pub weights: Vec<f64>,
}

/// The chunks of one prompt and A1111's token count.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunks {
    pub chunks: Vec<PromptChunk>,
    /// `tokenize_line`'s `token_count`: 75 for every chunk but the last, plus the last one's
    /// tokens (what A1111's token counter shows left of the slash).
    pub token_count: usize,
}

/// The chunk being filled and the finished ones (`tokenize_line`'s closure state).
struct ChunkBuilder<'t, T: PromptTokenizer + ?Sized> {
    tokenizer: &'t T,
    chunks: Vec<PromptChunk>,
    ids: Vec<u32>,
    weights: Vec<f64>,
    last_comma: Option<usize>,
    token_count: usize,
}

impl<T: PromptTokenizer + ?Sized> ChunkBuilder<'_, T> {
    /// A1111's `next_chunk`.
    fn next_chunk(&mut self, is_last: bool) {
        self.token_count += if is_last { self.ids.len() } else { CHUNK_TOKENS };
        let ids = std::mem::take(&mut self.ids);
        let weights = std::mem::take(&mut self.weights);
        self.chunks.push(wrap_chunk(self.tokenizer, ids, weights));
        self.last_comma = None;
    }

    /// One token of a fragment of weight `weight`, with the comma backtrack first.
    fn push(&mut self, token: u32, weight: f64, comma_backtrack: usize) {
        if Some(token) == self.tokenizer.comma_id() {
            self.last_comma = Some(self.ids.len());
        } else if let Some(comma) = self.last_comma.filter(|&comma| {
            comma_backtrack != 0 && self.ids.len() == CHUNK_TOKENS && CHUNK_TOKENS - comma <= comma_backtrack
        }) {
            let moved_ids = self.ids.split_off(comma + 1);
            let moved_weights = self.weights.split_off(comma + 1);
            self.next_chunk(false);
            self.ids = moved_ids;
            self.weights = moved_weights;
        }
        if self.ids.len() == CHUNK_TOKENS {
            self.next_chunk(false);
        }
        self.ids.push(token);
        self.weights.push(weight);
    }
}

/// `[BOS] + tokens + EOS padding + [EOS]`, then the tokenizer's pad id after the first EOS.
fn wrap_chunk<T: PromptTokenizer + ?Sized>(tokenizer: &T, tokens: Vec<u32>, token_weights: Vec<f64>) -> PromptChunk {
    let (bos, eos, pad) = (tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.pad_id());
    let mut ids = Vec::with_capacity(CHUNK_IDS);
    ids.push(bos);
    ids.extend(&tokens);
    ids.resize(CHUNK_IDS, eos);
    let mut weights = Vec::with_capacity(CHUNK_IDS);
    weights.push(1.0);
    weights.extend(&token_weights);
    weights.resize(CHUNK_IDS, 1.0);
    if let Some(first_eos) = ids.iter().position(|&id| id == eos) {
        ids[first_eos + 1..].fill(pad);
    }
    PromptChunk { ids, weights }
}

/// The chunk of the empty prompt, `[BOS, EOS, padding...]`: A1111's `empty_chunk()` (after
/// `process_tokens`), the encoding `--pad-conds` appends, and ComfyUI's `gen_empty_tokens`,
/// the reference of `--emphasis comfy`.
pub fn empty_chunk<T: PromptTokenizer + ?Sized>(tokenizer: &T) -> PromptChunk {
    wrap_chunk(tokenizer, Vec::new(), Vec::new())
}

/// A1111's `tokenize_line` after the parse: the fragments' tokens in chunks.
pub fn chunk_fragments<T: PromptTokenizer + ?Sized>(
    fragments: &[Fragment],
    tokenizer: &T,
    comma_backtrack: usize,
) -> Result<Chunks> {
    let mut builder = ChunkBuilder {
        tokenizer,
        chunks: Vec::new(),
        ids: Vec::with_capacity(CHUNK_TOKENS),
        weights: Vec::with_capacity(CHUNK_TOKENS),
        last_comma: None,
        token_count: 0,
    };
    for fragment in fragments {
        if fragment.is_break() {
            builder.next_chunk(false);
            continue;
        }
        for token in tokenizer.token_ids(&fragment.text)? {
            builder.push(token, fragment.weight, comma_backtrack);
        }
    }
    if !builder.ids.is_empty() || builder.chunks.is_empty() {
        builder.next_chunk(true);
    }
    Ok(Chunks {
        chunks: builder.chunks,
        token_count: builder.token_count,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::prompt::parse::parse_attention;

    pub const BOS: u32 = 49406;
    pub const EOS: u32 = 49407;
    pub const COMMA: u32 = 267;

    /// One token per word: `wN` is id N; `,` is the comma; `eos` is EOS. Pads with `pad`.
    pub struct WordTokenizer {
        pub pad: u32,
    }

    impl PromptTokenizer for WordTokenizer {
        fn token_ids(&self, text: &str) -> Result<Vec<u32>> {
            Ok(text
                .replace(',', " , ")
                .split_whitespace()
                .map(|word| match word {
                    "," => COMMA,
                    "eos" => EOS,
                    w => w.trim_start_matches('w').parse().unwrap(),
                })
                .collect())
        }
        fn bos_id(&self) -> u32 {
            BOS
        }
        fn eos_id(&self) -> u32 {
            EOS
        }
        fn pad_id(&self) -> u32 {
            self.pad
        }
        fn comma_id(&self) -> Option<u32> {
            Some(COMMA)
        }
        fn token_text(&self, id: u32) -> String {
            format!("w{id}")
        }
    }

    const SD1: WordTokenizer = WordTokenizer { pad: EOS };
    const SD2: WordTokenizer = WordTokenizer { pad: 0 };

    /// `n` words `w1000`, `w1001`, ..., with a comma after the word at each of `commas`.
    fn words(n: usize, commas: &[usize]) -> String {
        let mut text = String::new();
        for i in 0..n {
            text.push_str(&format!("w{} ", 1000 + i));
            if commas.contains(&i) {
                text.push_str(", ");
            }
        }
        text
    }

    fn chunks(prompt: &str, tokenizer: &WordTokenizer) -> Chunks {
        chunk_fragments(&parse_attention(prompt).unwrap(), tokenizer, DEFAULT_COMMA_BACKTRACK).unwrap()
    }

    /// The prompt tokens of a chunk: between BOS and the first EOS.
    fn body(chunk: &PromptChunk) -> &[u32] {
        let end = chunk.ids.iter().position(|&id| id == EOS).unwrap();
        &chunk.ids[1..end]
    }

    #[test]
    fn the_empty_prompt_is_one_padding_chunk() {
        let c = chunks("", &SD1);
        assert_eq!(c.token_count, 0);
        assert_eq!(c.chunks.len(), 1);
        assert_eq!(c.chunks[0].ids[..2], [BOS, EOS]);
        assert!(c.chunks[0].ids[2..].iter().all(|&id| id == EOS));
        assert!(c.chunks[0].weights.iter().all(|&w| w == 1.0));
        assert_eq!(c.chunks[0], empty_chunk(&SD1));
    }

    #[test]
    fn sd2_pads_after_the_first_eos() {
        let c = chunks("w5 w6", &SD2);
        assert_eq!(c.chunks[0].ids[..4], [BOS, 5, 6, EOS]);
        assert!(c.chunks[0].ids[4..].iter().all(|&id| id == 0));
        // A1111 looks for the first EOS, even one the prompt wrote.
        let c = chunks("w5 eos w6", &SD2);
        assert_eq!(c.chunks[0].ids[..4], [BOS, 5, EOS, 0]);
        assert_eq!(empty_chunk(&SD2).ids[..3], [BOS, EOS, 0]);
    }

    #[test]
    fn exactly_75_tokens_fit_one_chunk_and_76_make_two() {
        let c = chunks(&words(75, &[]), &SD1);
        assert_eq!((c.chunks.len(), c.token_count), (1, 75));
        assert_eq!(c.chunks[0].ids[76], EOS);
        let c = chunks(&words(76, &[]), &SD1);
        assert_eq!((c.chunks.len(), c.token_count), (2, 76));
        assert_eq!(body(&c.chunks[1]), [1075]);
    }

    /// A comma at chunk index `i` (the word before it at i - 1), then enough words for a second
    /// chunk: the first chunk's length.
    fn first_chunk_len_with_comma_at(i: usize) -> usize {
        let c = chunks(&words(90, &[i - 1]), &SD1);
        body(&c.chunks[0]).len()
    }

    #[test]
    fn comma_backtrack_edges() {
        // Comma at index 54: 75 - 54 = 21 > 20, no backtrack.
        assert_eq!(first_chunk_len_with_comma_at(54), 75);
        // 55: 75 - 55 = 20, the 19 tokens after it move on.
        assert_eq!(first_chunk_len_with_comma_at(55), 56);
        assert_eq!(first_chunk_len_with_comma_at(56), 57);
        // 74, the last slot: nothing to move.
        assert_eq!(first_chunk_len_with_comma_at(74), 75);
        // 75: the comma itself opens the next chunk (and is forgotten there).
        let c = chunks(&words(90, &[74]), &SD1);
        assert_eq!(body(&c.chunks[0]).len(), 75);
        assert_eq!(body(&c.chunks[1])[0], COMMA);
    }

    #[test]
    fn backtracked_tokens_keep_their_weights() {
        let prompt = format!("{} (w7 w8 w9:1.5)", words(70, &[59]));
        let c = chunks(&prompt, &SD1);
        // 70 words + comma = 71 tokens, + 3 = 74: one chunk; then 76 tokens need two.
        assert_eq!(c.chunks.len(), 1);
        let prompt = format!("{} (w7 w8 w9:1.5)", words(73, &[59]));
        let c = chunks(&prompt, &SD1);
        assert_eq!(body(&c.chunks[0]).len(), 61);
        assert_eq!(
            body(&c.chunks[1]),
            [1060, 1061, 1062, 1063, 1064, 1065, 1066, 1067, 1068, 1069, 1070, 1071, 1072, 7, 8, 9]
        );
        assert_eq!(c.chunks[1].weights[13..18], [1.0, 1.5, 1.5, 1.5, 1.0]);
        assert_eq!(c.token_count, 75 + 16);
    }

    #[test]
    fn comma_backtrack_zero_is_off() {
        let c = chunk_fragments(&parse_attention(&words(90, &[59])).unwrap(), &SD1, 0).unwrap();
        assert_eq!(body(&c.chunks[0]).len(), 75);
    }

    #[test]
    fn break_starts_a_chunk() {
        let c = chunks("w1 BREAK w2", &SD1);
        assert_eq!(c.chunks.len(), 2);
        assert_eq!((body(&c.chunks[0]), body(&c.chunks[1])), (&[1][..], &[2][..]));
        assert_eq!(c.token_count, 76);
        // Leading: an all-padding chunk first; trailing: no extra chunk.
        let c = chunks("BREAK w1", &SD1);
        assert_eq!(c.chunks.len(), 2);
        assert_eq!(c.chunks[0], empty_chunk(&SD1));
        let c = chunks("w1 BREAK", &SD1);
        assert_eq!(c.chunks.len(), 1);
        assert_eq!(c.token_count, 75);
        // Inside brackets it is no break (and here no word of the test tokenizer either).
        let fragments = parse_attention("(w1 BREAK w2)").unwrap();
        assert!(!fragments.iter().any(Fragment::is_break));
    }
}
