//! What a token's weight does to its hidden state, on any text encoder's output (A1111's
//! `modules/sd_emphasis.py`, ComfyUI's `comfy/sd1_clip.py` `encode_token_weights`), and a whole
//! prompt's chunks encoded and joined along the token axis (A1111's
//! `FrozenCLIPEmbedderWithCustomWordsBase.forward`: one encoder pass per chunk, `torch.hstack`).
//!
//! - `original` (A1111's default, `EmphasisOriginal`): `z * w`, then the whole chunk rescaled so
//!   its mean is unchanged, `z * (mean(z) / mean(z * w))`; the mean is one scalar over the chunk
//!   tensor, BOS, EOS and padding included. Every token shrinks a little: the emphasized token
//!   gains less than its weight says.
//! - `no-norm` (`EmphasisOriginalNoNorm`, "No norm"): `z * w`.
//! - `ignore` (`EmphasisIgnore`): brackets parsed away, weights not applied.
//! - `comfy`: ComfyUI's weights ([`super::parse::parse_comfy`]) and, for each token whose weight
//!   is not 1, `z_empty + (z - z_empty) * w` against the same position of the empty prompt's
//!   encoding; no mean restoration.
//!
//! The arithmetic runs in f32 (weights cast to f32, as `torch.asarray` makes them), the result
//! in the hidden states' dtype.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::chunks::{PromptChunk, CHUNK_IDS};
use super::parse::{parse_attention, parse_comfy, Fragment};

/// How prompt weights change the text encoder's output: `--emphasis`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Emphasis {
    #[default]
    Original,
    NoNorm,
    Ignore,
    Comfy,
}

impl Emphasis {
    pub const ALL: [Self; 4] = [Self::Original, Self::NoNorm, Self::Ignore, Self::Comfy];

    /// The command-line spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::Original => "original",
            Self::NoNorm => "no-norm",
            Self::Ignore => "ignore",
            Self::Comfy => "comfy",
        }
    }

    /// The value of A1111's infotext `Emphasis:` and its `emphasis` option; `Comfy` is sdfix's
    /// own and has no A1111 name.
    pub fn a1111_name(self) -> &'static str {
        match self {
            Self::Original => "Original",
            Self::NoNorm => "No norm",
            Self::Ignore => "Ignore",
            Self::Comfy => "Comfy",
        }
    }

    /// The prompt's fragments as this mode weighs them: ComfyUI's parse for `comfy`, A1111's
    /// `parse_prompt_attention` otherwise (`ignore` parses too, to take the brackets out).
    pub fn fragments(self, prompt: &str) -> Result<Vec<Fragment>> {
        match self {
            Self::Comfy => Ok(parse_comfy(prompt)),
            _ => parse_attention(prompt),
        }
    }
}

impl fmt::Display for Emphasis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Emphasis {
    type Err = anyhow::Error;

    /// The command-line names, and A1111's (`Original`, `No norm`, `Ignore`) for its API and
    /// infotexts.
    fn from_str(s: &str) -> Result<Self> {
        let wanted = s.trim().to_ascii_lowercase().replace(' ', "-");
        match Self::ALL.into_iter().find(|e| e.name() == wanted) {
            Some(emphasis) => Ok(emphasis),
            None => bail!("unknown emphasis {s:?}: use original, no-norm, ignore or comfy"),
        }
    }
}

/// Applies `emphasis` to hidden states `z` (b, n, d) whose tokens weigh `weights` (b * n values,
/// row-major). `empty` is the encoding of the empty prompt's chunk (1, n, d), needed by `comfy`
/// only. For `original` the mean is over all of `z`: give it one prompt's chunk (b = 1), or the
/// same chunk of one prompt's variants (A1111's batch holds a prompt's schedule variants), never
/// chunks of different prompts stacked into one batch, whose means would mix.
pub fn apply_emphasis(z: &Tensor, weights: &[f64], emphasis: Emphasis, empty: Option<&Tensor>) -> Result<Tensor> {
    let (b, n, d) = z.dims3().context("hidden states must be (batch, tokens, features)")?;
    ensure!(
        weights.len() == b * n,
        "{} token weights for hidden states of {b}x{n} tokens",
        weights.len()
    );
    if emphasis == Emphasis::Ignore {
        return Ok(z.clone());
    }
    let dtype = z.dtype();
    let device = z.device();
    let z = z.to_dtype(DType::F32)?;
    let w32: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
    let w = Tensor::from_vec(w32.clone(), (b, n, 1), device)?;
    let weighted = match emphasis {
        Emphasis::Ignore => z,
        Emphasis::NoNorm => z.broadcast_mul(&w)?,
        Emphasis::Original => {
            let original_mean = z.mean_all()?.to_scalar::<f32>()?;
            let weighted = z.broadcast_mul(&w)?;
            let weighted_mean = weighted.mean_all()?.to_scalar::<f32>()?;
            weighted.affine(f64::from(original_mean / weighted_mean), 0.0)?
        }
        Emphasis::Comfy => {
            let empty = empty.context("--emphasis comfy needs the encoding of the empty prompt")?;
            ensure!(
                empty.dims() == [1, n, d],
                "the empty prompt's encoding is {:?}, not (1, {n}, {d})",
                empty.dims()
            );
            let empty = empty.to_dtype(DType::F32)?; // (1, n, d)
            let moved = z.broadcast_sub(&empty)?.broadcast_mul(&w)?.broadcast_add(&empty)?;
            // ComfyUI changes only the tokens whose weight is not 1.
            let changed: Vec<u8> = w32.iter().map(|&w| u8::from(w != 1.0)).collect();
            let changed = Tensor::from_vec(changed, (b, n, 1), device)?.broadcast_as((b, n, d))?;
            changed.where_cond(&moved, &z)?
        }
    };
    Ok(weighted.to_dtype(dtype)?)
}

/// A whole prompt's conditioning (1, 77 * chunks, d): each chunk's 77 ids through `encode`
/// (one pass each, positions 0..76 every time), `emphasis` applied per chunk, the chunks joined
/// along the token axis. `empty` is the empty chunk's encoding, for `comfy` (encode
/// [`super::chunks::empty_chunk`] once per model and keep it).
pub fn encode_chunks<F>(
    chunks: &[PromptChunk],
    emphasis: Emphasis,
    empty: Option<&Tensor>,
    mut encode: F,
) -> Result<Tensor>
where
    F: FnMut(&[u32]) -> Result<Tensor>,
{
    ensure!(!chunks.is_empty(), "a prompt has at least one chunk");
    let mut encoded = Vec::with_capacity(chunks.len());
    for (i, chunk) in chunks.iter().enumerate() {
        let z = encode(&chunk.ids).with_context(|| format!("encoding chunk {} of the prompt", i + 1))?;
        ensure!(
            z.dims().len() == 3 && z.dims()[..2] == [1, CHUNK_IDS],
            "the text encoder returned {:?} for one chunk, not (1, {CHUNK_IDS}, features)",
            z.dims()
        );
        encoded.push(apply_emphasis(&z, &chunk.weights, emphasis, empty)?);
    }
    Ok(Tensor::cat(&encoded, 1)?)
}

/// A1111's "Pad prompt/negative prompt" (`pad_cond_uncond`): the conditioning with fewer chunks
/// gets copies of the empty prompt's encoding `empty` (1, 77, d) appended until both have as
/// many tokens, so they fit one UNet batch. Both are (b, 77 * k, d).
pub fn pad_to_same_length(cond: &Tensor, uncond: &Tensor, empty: &Tensor) -> Result<(Tensor, Tensor)> {
    let (_, cond_tokens, _) = cond.dims3().context("the prompt's conditioning")?;
    let (_, uncond_tokens, _) = uncond.dims3().context("the negative prompt's conditioning")?;
    let (_, empty_tokens, _) = empty.dims3().context("the empty prompt's conditioning")?;
    ensure!(empty_tokens > 0, "the empty prompt's conditioning has no tokens");
    let pad = |t: &Tensor, repeats: usize| -> Result<Tensor> {
        let batch = t.dim(0)?;
        let copies = empty.to_dtype(t.dtype())?.repeat((batch, repeats, 1))?; // (b, 77 * repeats, d)
        Ok(Tensor::cat(&[t, &copies], 1)?)
    };
    Ok(match cond_tokens.cmp(&uncond_tokens) {
        std::cmp::Ordering::Less => (pad(cond, (uncond_tokens - cond_tokens) / empty_tokens)?, uncond.clone()),
        std::cmp::Ordering::Greater => (cond.clone(), pad(uncond, (cond_tokens - uncond_tokens) / empty_tokens)?),
        std::cmp::Ordering::Equal => (cond.clone(), uncond.clone()),
    })
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn tensor(rows: &[[f32; 2]]) -> Tensor {
        Tensor::from_vec(rows.concat(), (1, rows.len(), 2), &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn assert_close(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{got:?} != {want:?}");
        }
    }

    /// The spec's worked example (section 1.3).
    #[test]
    fn original_keeps_the_chunk_mean() {
        let z = tensor(&[[1., 2.], [3., 4.], [-1., 0.]]);
        let out = apply_emphasis(&z, &[1.0, 1.1, 1.0], Emphasis::Original, None).unwrap();
        assert_close(&values(&out), &[0.927835, 1.85567, 3.061856, 4.082474, -0.927835, 0.0]);
        let no_norm = apply_emphasis(&z, &[1.0, 1.1, 1.0], Emphasis::NoNorm, None).unwrap();
        assert_close(&values(&no_norm), &[1., 2., 3.3, 4.4, -1., 0.]);
        let ignored = apply_emphasis(&z, &[1.0, 1.1, 1.0], Emphasis::Ignore, None).unwrap();
        assert_eq!(values(&ignored), values(&z));
    }

    /// The spec's ComfyUI example: (3, 4) against (1, 1) at weight 1.1 is (3.2, 4.3); weight-1
    /// tokens are left exactly as they are.
    #[test]
    fn comfy_moves_away_from_the_empty_prompt() {
        let z = tensor(&[[3., 4.], [0.3, 0.7]]);
        let empty = tensor(&[[1., 1.], [0.1, 0.2]]);
        let out = apply_emphasis(&z, &[1.1, 1.0], Emphasis::Comfy, Some(&empty)).unwrap();
        assert_eq!(values(&out)[2..], [0.3, 0.7]);
        assert_close(&values(&out)[..2], &[3.2, 4.3]);
        assert!(apply_emphasis(&z, &[1.1, 1.0], Emphasis::Comfy, None).is_err());
    }

    #[test]
    fn names_round_trip() {
        for e in Emphasis::ALL {
            assert_eq!(e.name().parse::<Emphasis>().unwrap(), e);
            assert_eq!(e.a1111_name().parse::<Emphasis>().unwrap(), e);
        }
        assert!("strong".parse::<Emphasis>().is_err());
    }

    #[test]
    fn pads_the_shorter_with_empty_chunks() {
        let dev = Device::Cpu;
        let empty = Tensor::full(7f32, (1, 77, 2), &dev).unwrap();
        let cond = Tensor::zeros((2, 77 * 3, 2), DType::F32, &dev).unwrap();
        let uncond = Tensor::ones((2, 77, 2), DType::F32, &dev).unwrap();
        let (c, u) = pad_to_same_length(&cond, &uncond, &empty).unwrap();
        assert_eq!(c.dims(), [2, 231, 2]);
        assert_eq!(u.dims(), [2, 231, 2]);
        assert_eq!(values(&u.narrow(1, 0, 77).unwrap()), vec![1.0; 2 * 77 * 2]);
        assert_eq!(values(&u.narrow(1, 77, 154).unwrap()), vec![7.0; 2 * 154 * 2]);
        let (u2, c2) = pad_to_same_length(&uncond, &cond, &empty).unwrap();
        assert_eq!((u2.dims(), c2.dims()), (u.dims(), c.dims()));
    }

    #[test]
    fn chunks_are_encoded_apart_and_joined() {
        let chunk = |w: f64| PromptChunk {
            ids: (0..77).collect(),
            weights: vec![w; 77],
        };
        let mut calls = 0;
        let out = encode_chunks(&[chunk(1.0), chunk(2.0)], Emphasis::NoNorm, None, |ids| {
            calls += 1;
            let ids: Vec<f32> = ids.iter().map(|&i| i as f32).collect();
            Ok(Tensor::from_vec(ids, (1, 77, 1), &Device::Cpu)?)
        })
        .unwrap();
        assert_eq!(calls, 2);
        assert_eq!(out.dims(), [1, 154, 1]);
        assert_eq!(values(&out)[76..79], [76.0, 0.0, 2.0]);
    }
}
