//! Prompt files for batch runs.
//!
//! - `.txt`: one prompt per line; blank lines and lines starting with `#` are skipped.
//! - `.jsonl`: one JSON object per line with `prompt` (required) and any setting of a request by
//!   its key ([`Overrides`]: `negative_prompt`, `seed`, `steps`, `guidance`, `sampler`, `width`,
//!   `init_image`, `strength`, `mask`, `loras`, ...), overriding the command line for that line
//!   (`init_image`, `mask` and the files of `loras` are paths relative to the prompt file;
//!   `loras` is a list of `FILE[:WEIGHT]` as `--lora` takes, replacing the `--lora` set, `[]`
//!   for none). A key that is no setting is an error for that line. Blank and `#` lines are
//!   skipped too.
//! - `-`: standard input, as `.txt` unless its first entry starts with `{`.
//!
//! A bad line is an error for that line only (with its file:line), so a run can go on with the
//! others. Entries are numbered in file order (bad ones included), which `--shard` uses.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};

use crate::engine::Overrides;

/// One prompt of a file.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptEntry {
    /// 1-based line number in the file (0 for `--prompt`).
    pub line: usize,
    /// Position among the file's entries, from 0 (what `--shard` divides).
    pub index: usize,
    pub prompt: String,
    /// The line's settings (its `prompt` included).
    pub overrides: Overrides,
    /// The keys the line gave: its errors name these by key, the others by flag.
    pub keys: Vec<String>,
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
            Format::Text => Ok((Overrides::default(), Vec::new())),
            Format::Jsonl => parse_json_line(trimmed),
        };
        let entry = parsed.and_then(|(overrides, keys)| {
            let prompt = match format {
                Format::Text => trimmed.to_string(),
                Format::Jsonl => overrides.prompt.clone().unwrap_or_default(),
            };
            if prompt.trim().is_empty() {
                return Err("empty prompt".to_string());
            }
            Ok(PromptEntry {
                line,
                index,
                prompt,
                overrides,
                keys,
            })
        });
        entries.push(entry.map_err(|message| LineError { line, index, message }));
    }
    entries
}

/// A `.jsonl` line: an object with a string `prompt` and settings by key.
fn parse_json_line(line: &str) -> Result<(Overrides, Vec<String>), String> {
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let keys: Vec<String> = match value.as_object() {
        Some(object) => object.keys().cloned().collect(),
        None => return Err("expected a JSON object with \"prompt\"".to_string()),
    };
    if !value.get("prompt").is_some_and(serde_json::Value::is_string) {
        return Err("\"prompt\": missing; every line needs one (a string)".to_string());
    }
    Ok((Overrides::parse_object(value, true)?, keys))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::Sampler;
    use crate::schedule::TimestepSpacing;

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
