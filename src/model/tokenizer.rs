//! The CLIP BPE tokenizer, as transformers' `CLIPTokenizer` (5.x, tokenizers-backed) builds it,
//! and the padding/truncation SD pipelines apply: `<|startoftext|>`, at most 75 tokens,
//! `<|endoftext|>`, then the pad token up to 77 ids.
//!
//! From `tokenizer/tokenizer.json` when the folder has one, otherwise from `vocab.json` and
//! `merges.txt` (SD 2.x's layout): NFC, whitespace runs to one space, lowercase; CLIP's split
//! regex; byte-level; BPE with the `</w>` end-of-word suffix. The special tokens of
//! `special_tokens_map.json` are matched in the raw text before BPE, as transformers does: SD 2.x
//! pads with "!", so "wow!!" becomes `wow`, `!`, `!` (ids 0, 0), which is what diffusers feeds SD.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as Normalizers, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizers;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::prompt::chunks::{PromptTokenizer, COMMA_TOKEN};

/// CLIP's pre-tokenization pattern (OpenAI CLIP's `simple_tokenizer.py`).
const CLIP_SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
const END_OF_WORD_SUFFIX: &str = "</w>";
const DEFAULT_BOS: &str = "<|startoftext|>";
const DEFAULT_EOS: &str = "<|endoftext|>";
/// CLIP's context length: every prompt becomes this many ids.
pub const DEFAULT_MAX_LENGTH: usize = 77;
/// tokenizer_config.json files sometimes hold `model_max_length` = 1e30 ("no limit"): ignore
/// anything above this.
const PLAUSIBLE_MAX_LENGTH: u64 = 1 << 20;

#[derive(Debug)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    max_length: usize,
}

/// A special token's text: `"<|endoftext|>"` or `{"content": "<|endoftext|>", ...}`.
fn token_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn read_optional_json(path: &Path) -> Result<Value> {
    if !path.is_file() {
        return Ok(Value::Null);
    }
    crate::config::read_json(path)
}

impl ClipTokenizer {
    /// Loads the tokenizer folder of a diffusers-layout model.
    pub fn from_folder(folder: &Path) -> Result<Self> {
        let special_map = read_optional_json(&folder.join("special_tokens_map.json"))?;
        let config = read_optional_json(&folder.join("tokenizer_config.json"))?;
        let special = |key: &str| token_text(special_map.get(key)).or_else(|| token_text(config.get(key)));
        let bos = special("bos_token").unwrap_or_else(|| DEFAULT_BOS.into());
        let eos = special("eos_token").unwrap_or_else(|| DEFAULT_EOS.into());
        let unk = special("unk_token").unwrap_or_else(|| eos.clone());
        let pad = special("pad_token").unwrap_or_else(|| eos.clone());
        let max_length = config
            .get("model_max_length")
            .and_then(Value::as_u64)
            .filter(|&n| n <= PLAUSIBLE_MAX_LENGTH)
            .map_or(DEFAULT_MAX_LENGTH, |n| n as usize);

        let tokenizer_json = folder.join("tokenizer.json");
        let mut tokenizer = if tokenizer_json.is_file() {
            Tokenizer::from_file(&tokenizer_json)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("{} is not a valid tokenizer", tokenizer_json.display()))?
        } else {
            Self::from_vocab_and_merges(folder, &unk)?
        };
        let specials: Vec<AddedToken> = [&bos, &eos, &unk, &pad]
            .iter()
            .map(|t| AddedToken::from(t.to_string(), true))
            .collect();
        tokenizer.add_special_tokens(&specials);
        let id = |token: &str| {
            tokenizer
                .token_to_id(token)
                .with_context(|| format!("{}: special token {token:?} is not in the vocabulary", folder.display()))
        };
        let (bos, eos, pad) = (id(&bos)?, id(&eos)?, id(&pad)?);
        ensure!(
            max_length >= 2,
            "{}: model_max_length {max_length} leaves no room for a prompt",
            folder.display()
        );
        Ok(Self {
            tokenizer,
            bos,
            eos,
            pad,
            max_length,
        })
    }

    fn from_vocab_and_merges(folder: &Path, unk: &str) -> Result<Tokenizer> {
        let vocab = folder.join("vocab.json");
        let merges = folder.join("merges.txt");
        for file in [&vocab, &merges] {
            ensure!(
                file.is_file(),
                "{} is missing (the tokenizer needs tokenizer.json, or vocab.json and merges.txt)",
                file.display()
            );
        }
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix(END_OF_WORD_SUFFIX.into())
            .unk_token(unk.into())
            .fuse_unk(false)
            .build()
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("cannot read the BPE vocabulary in {}", folder.display()))?;
        let mut tokenizer = Tokenizer::new(bpe);
        let whitespace = Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )
        .map_err(anyhow::Error::msg)?;
        tokenizer.with_normalizer(Some(Normalizers::new(vec![
            NFC.into(),
            whitespace.into(),
            Lowercase.into(),
        ])));
        let split = Split::new(
            SplitPattern::Regex(CLIP_SPLIT_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(anyhow::Error::msg)?;
        // transformers' ByteLevel(add_prefix_space=False) keeps trim_offsets and use_regex on.
        tokenizer.with_pre_tokenizer(Some(PreTokenizers::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        Ok(tokenizer)
    }

    /// The number of ids every prompt becomes.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The BPE ids of `text` without BOS, EOS or padding, never truncated: what A1111's
    /// `tokenize_line` puts into chunks ([`crate::prompt::chunks`]).
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(anyhow::Error::msg)
            .context("tokenizing the prompt")?;
        Ok(encoding.get_ids().to_vec())
    }

    /// `prompt` as exactly `max_length` ids: BOS, the first `max_length - 2` tokens, EOS, padding.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(prompt, false)
            .map_err(anyhow::Error::msg)
            .context("tokenizing the prompt")?;
        let body = encoding.get_ids();
        let kept = body.len().min(self.max_length - 2);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos);
        ids.extend_from_slice(&body[..kept]);
        ids.push(self.eos);
        ids.resize(self.max_length, self.pad);
        Ok(ids)
    }

    /// How many tokens of `prompt` do not fit and are dropped (for a warning).
    pub fn truncated_tokens(&self, prompt: &str) -> Result<usize> {
        let encoding = self.tokenizer.encode(prompt, false).map_err(anyhow::Error::msg)?;
        Ok(encoding.get_ids().len().saturating_sub(self.max_length - 2))
    }
}

impl PromptTokenizer for ClipTokenizer {
    fn token_ids(&self, text: &str) -> Result<Vec<u32>> {
        ClipTokenizer::token_ids(self, text)
    }

    fn bos_id(&self) -> u32 {
        self.bos
    }

    fn eos_id(&self) -> u32 {
        self.eos
    }

    fn pad_id(&self) -> u32 {
        self.pad
    }

    fn comma_id(&self) -> Option<u32> {
        self.tokenizer.token_to_id(COMMA_TOKEN)
    }

    fn token_text(&self, id: u32) -> String {
        self.tokenizer.id_to_token(id).unwrap_or_else(|| format!("<id {id}>"))
    }
}
