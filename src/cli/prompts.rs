//! Prompt files for batch runs.
//!
//! - `.txt`: one prompt per line; blank lines and lines starting with `#` are skipped.
//! - `.jsonl`: one JSON object per line with `prompt` (required) and any of `negative_prompt`,
//!   `seed`, `steps`, `guidance`, `guidance_rescale`, `spacing`, `zero_snr`, `sampler`, `width`,
//!   `height`, `num_images`, `init_image`, `strength`, `mask`, `loras`, overriding the command line
//!   for that line (`init_image`, `mask` and the files of `loras` are paths relative to the prompt
//!   file; `loras` is a list of `FILE[:WEIGHT]` as `--lora` takes, replacing the `--lora` set, `[]`
//!   for none). Blank and `#` lines are skipped too.
//! - `-`: standard input, as `.txt` unless its first entry starts with `{`.
//!
//! A bad line is an error for that line only (with its file:line), so a run can go on with the
//! others. Entries are numbered in file order (bad ones included), which `--shard` uses.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::sampling::Sampler;
use crate::schedule::TimestepSpacing;

/// What one line may override; `None` keeps the command line's value.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineOverrides {
    pub negative_prompt: Option<String>,
    pub seed: Option<u64>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub guidance_rescale: Option<f64>,
    #[serde(default, deserialize_with = "parsed")]
    pub spacing: Option<TimestepSpacing>,
    pub zero_snr: Option<bool>,
    #[serde(default, deserialize_with = "parsed")]
    pub sampler: Option<Sampler>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub num_images: Option<usize>,
    /// img2img's picture, relative to the prompt file.
    pub init_image: Option<String>,
    pub strength: Option<f64>,
    /// Inpainting's mask, relative to the prompt file.
    pub mask: Option<String>,
    /// `FILE[:WEIGHT]` entries as `--lora` takes them, files relative to the prompt file: the
    /// line's LoRA set, instead of `--lora`'s (`[]`: none). Parsed by the front-end, which names
    /// the key in its errors.
    #[serde(default, deserialize_with = "lora_list")]
    pub loras: Option<Vec<String>>,
}

/// `loras`: a list of strings, or an error that names the key (serde's own would not).
fn lora_list<'de, D>(d: D) -> std::result::Result<Option<Vec<String>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let Some(value) = Option::<serde_json::Value>::deserialize(d)? else {
        return Ok(None);
    };
    let items = value.as_array().and_then(|items| {
        items
            .iter()
            .map(|item| item.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
    });
    items.map(Some).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "\"loras\": expected a list of \"FILE[:WEIGHT]\" strings, as [\"style.safetensors:0.8\"], not {value}"
        ))
    })
}

/// A string value parsed by its type's `FromStr` (`"spacing": "leading"`, `"sampler": "euler"`).
fn parsed<'de, D, T>(d: D) -> std::result::Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr<Err = String>,
{
    Option::<String>::deserialize(d)?
        .map(|s| s.parse().map_err(serde::de::Error::custom))
        .transpose()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonLine {
    prompt: String,
    #[serde(flatten)]
    overrides: LineOverrides,
}

/// One prompt of a file.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptEntry {
    /// 1-based line number in the file (0 for `--prompt`).
    pub line: usize,
    /// Position among the file's entries, from 0 (what `--shard` divides).
    pub index: usize,
    pub prompt: String,
    pub overrides: LineOverrides,
}

/// A line that could not be used, with its place in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct LineError {
    pub line: usize,
    pub index: usize,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Text,
    Jsonl,
}

/// Reads `path` (or stdin for `-`) into entries and per-line errors, in file order.
pub fn read_prompt_file(path: &Path) -> Result<(String, Vec<Result<PromptEntry, LineError>>)> {
    let (label, text, format) = if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("--prompts -: cannot read standard input")?;
        let json = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .is_some_and(|l| l.starts_with('{'));
        (
            "<stdin>".to_string(),
            text,
            if json { Format::Jsonl } else { Format::Text },
        )
    } else {
        let format = match path.extension().and_then(|e| e.to_str()) {
            Some("txt") => Format::Text,
            Some("jsonl") => Format::Jsonl,
            _ => anyhow::bail!(
                "--prompts {}: expected a .txt or .jsonl file (or - for stdin)",
                path.display()
            ),
        };
        let text =
            std::fs::read_to_string(path).with_context(|| format!("--prompts {}: cannot read it", path.display()))?;
        (path.display().to_string(), text, format)
    };
    Ok((label, parse(&text, format)))
}

fn parse(text: &str, format: Format) -> Vec<Result<PromptEntry, LineError>> {
    let mut entries = Vec::new();
    for (number, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let (line, index) = (number + 1, entries.len());
        let parsed = match format {
            Format::Text => Ok((trimmed.to_string(), LineOverrides::default())),
            Format::Jsonl => serde_json::from_str::<JsonLine>(trimmed)
                .map(|j| (j.prompt, j.overrides))
                .map_err(|e| e.to_string()),
        };
        entries.push(match parsed {
            Ok((prompt, _)) if prompt.trim().is_empty() => Err(LineError {
                line,
                index,
                message: "empty prompt".into(),
            }),
            Ok((prompt, overrides)) => Ok(PromptEntry {
                line,
                index,
                prompt,
                overrides,
            }),
            Err(message) => Err(LineError { line, index, message }),
        });
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_skips_blanks_and_comments() {
        let entries = parse(
            "# brightness\n\nsolid black background\n  a white background  \n",
            Format::Text,
        );
        let prompts: Vec<_> = entries.iter().map(|e| e.as_ref().unwrap().prompt.as_str()).collect();
        assert_eq!(prompts, ["solid black background", "a white background"]);
        assert_eq!(entries[0].as_ref().unwrap().line, 3);
        assert_eq!(entries[1].as_ref().unwrap().index, 1);
    }

    #[test]
    fn jsonl_overrides_and_bad_lines() {
        let text = r#"{"prompt": "a red circle", "seed": 7, "spacing": "leading", "zero_snr": false}
{"prompt": "x", "colour": "red"}
{"prompt": ""}
not json
{"prompt": "a square", "spacing": "sideways"}
{"prompt": "ok", "steps": 10, "sampler": "dpmpp_2m"}
{"prompt": "no", "sampler": "heun"}"#;
        let entries = parse(text, Format::Jsonl);
        let first = entries[0].as_ref().unwrap();
        assert_eq!(first.overrides.seed, Some(7));
        assert_eq!(first.overrides.spacing, Some(TimestepSpacing::Leading));
        assert_eq!(first.overrides.zero_snr, Some(false));
        let errors: Vec<_> = entries.iter().filter_map(|e| e.as_ref().err()).collect();
        assert_eq!(errors.iter().map(|e| e.line).collect::<Vec<_>>(), [2, 3, 4, 5, 7]);
        assert!(errors[4].message.contains("heun"), "{}", errors[4].message);
        assert!(errors[0].message.contains("colour"), "{}", errors[0].message);
        assert!(errors[3].message.contains("sideways"), "{}", errors[3].message);
        assert_eq!(entries[5].as_ref().unwrap().overrides.steps, Some(10));
        let loras = parse(
            r#"{"prompt": "a", "loras": ["style.safetensors:0.8", "b.safetensors"]}
{"prompt": "b", "loras": []}
{"prompt": "c", "loras": "style.safetensors"}"#,
            Format::Jsonl,
        );
        assert_eq!(
            loras[0].as_ref().unwrap().overrides.loras.as_deref(),
            Some(&["style.safetensors:0.8".to_string(), "b.safetensors".to_string()][..])
        );
        assert_eq!(loras[1].as_ref().unwrap().overrides.loras, Some(Vec::new()));
        let err = loras[2].as_ref().unwrap_err();
        assert!(err.message.starts_with("\"loras\": expected a list"), "{}", err.message);
        assert_eq!(entries[5].as_ref().unwrap().overrides.sampler, Some(Sampler::DpmPp2m));
    }
}
