//! What an image records about how it was made.
//!
//! Each PNG carries two text chunks: `parameters`, in the AUTOMATIC1111 format that PNG-info
//! readers know (prompt line, `Negative prompt:` line, then `Key: value` pairs), and `sdfix`, the
//! full [`ImageRecord`] (made by the engine) as JSON, from which `generate --from-image` re-runs the image. Nothing
//! time-dependent goes in a PNG, so equal settings give equal bytes; timings go to the manifest.

use std::collections::BTreeMap;

use crate::engine::hires::HiresUpscaler;
use crate::prompt::Emphasis;
use crate::sampling::Sampler;

pub use crate::engine::record::{ImageRecord, SchedulerRecord};

/// The PNG text chunk keywords.
pub const PARAMETERS_CHUNK: &str = "parameters";
pub const SETTINGS_CHUNK: &str = "sdfix";

/// The model name A1111 shows: the repo id, the folder's last component, or a checkpoint file's
/// name without its extension.
fn model_name(model: &str) -> &str {
    let trimmed = model.trim_end_matches('/');
    let path = std::path::Path::new(trimmed);
    if path.is_file() {
        if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
            return stem;
        }
    }
    if std::path::Path::new(trimmed).is_dir() || trimmed.starts_with('.') || trimmed.starts_with('/') {
        trimmed.rsplit('/').next().unwrap_or(trimmed)
    } else {
        trimmed
    }
}

/// Capitalised spacing name, as A1111's "Schedule type" values are.
fn title(s: &str) -> String {
    let mut chars = s.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

/// A number as A1111 writes it: no trailing ".0".
fn number(x: f64) -> String {
    format!("{x}")
}

/// A value as A1111's `infotext_utils.quote` writes it: as it is, or JSON-quoted when it holds a
/// comma, a colon or a newline (JSON as Python's `json.dumps(ensure_ascii=False)`).
fn quote(text: &str) -> String {
    if text.contains([',', ':', '\n']) {
        serde_json::to_string(text).unwrap_or_else(|_| text.to_string())
    } else {
        text.to_string()
    }
}

/// The sampler's name as AUTOMATIC1111 writes it (`Euler a`, `DPM++ 2M`); an unknown name as it is.
fn a1111_sampler(name: &str) -> &str {
    name.parse::<Sampler>().map_or(name, |s| s.a1111_name())
}

impl ImageRecord {
    /// The AUTOMATIC1111 `parameters` text.
    pub fn a1111_parameters(&self) -> String {
        let mut text = self.prompt.clone();
        if !self.negative_prompt.is_empty() {
            text.push_str("\nNegative prompt: ");
            text.push_str(&self.negative_prompt);
        }
        let mut fields = vec![
            format!("Steps: {}", self.steps),
            format!("Sampler: {}", a1111_sampler(&self.sampler)),
            format!(
                "Schedule type: {}",
                title(if self.sigmas == "schedule" {
                    &self.spacing
                } else {
                    &self.sigmas
                })
            ),
            format!("CFG scale: {}", number(self.guidance)),
            format!("Seed: {}", self.seed),
            format!("Size: {}x{}", self.width, self.height),
        ];
        if let Some(hash) = &self.model_hash {
            fields.push(format!("Model hash: {hash}"));
        }
        fields.push(format!("Model: {}", model_name(&self.model)));
        if !self.loras.is_empty() {
            // A1111 quotes the list, whose items are separated by ", " like the fields.
            let hashes: Vec<String> = self.loras.iter().map(|l| format!("{}: {}", l.name, l.hash)).collect();
            fields.push(format!("Lora hashes: \"{}\"", hashes.join(", ")));
            let weights: Vec<String> = self
                .loras
                .iter()
                .map(|l| format!("{}: {}", l.name, number(l.weight)))
                .collect();
            fields.push(format!("Lora weights: \"{}\"", weights.join(", ")));
        }
        if let Some(img2img) = &self.img2img {
            fields.push(format!("Denoising strength: {}", number(img2img.strength)));
            if let Some(blur) = img2img.mask_blur {
                fields.push(format!("Mask blur: {}", number(blur)));
            }
        }
        if let Some(hires) = &self.hires {
            // A1111's txt2img: `Denoising strength`, then its `extra_generation_params` in the
            // order `init` and `calculate_target_resolution` set them: `Hires upscale` or
            // `Hires resize` (the two sides as asked, 0 for one left to the aspect ratio),
            // `Hires steps` only when not 0, `Hires upscaler`. `Size` above is the first pass.
            fields.push(format!("Denoising strength: {}", number(hires.strength)));
            match (hires.scale, hires.size) {
                (_, Some(size)) => fields.push(format!("Hires resize: {size}")),
                (scale, None) => fields.push(format!("Hires upscale: {}", number(scale.unwrap_or(1.0)))),
            }
            if hires.steps > 0 {
                fields.push(format!("Hires steps: {}", hires.steps));
            }
            let upscaler = hires
                .upscaler
                .parse::<HiresUpscaler>()
                .map_or(hires.upscaler.as_str(), |u| u.a1111_name());
            fields.push(format!("Hires upscaler: {upscaler}"));
            // Then `Hires sampler`, `Hires prompt` and `Hires negative prompt`, each only when it
            // differs from the first pass's (A1111's `init` and `setup_prompts`).
            if let Some(sampler) = &hires.sampler {
                fields.push(format!("Hires sampler: {}", a1111_sampler(sampler)));
            }
            if let Some(prompt) = &hires.prompt {
                fields.push(format!("Hires prompt: {}", quote(prompt)));
            }
            if let Some(negative) = &hires.negative_prompt {
                fields.push(format!("Hires negative prompt: {}", quote(negative)));
            }
        }
        // A1111's `create_infotext` writes Clip skip only past 1; `Emphasis` (`sd_hijack_clip`)
        // and `Pad conds` (`sd_samplers_cfg_denoiser`) are extra fields away from their defaults.
        if self.clip_skip > 1 {
            fields.push(format!("Clip skip: {}", self.clip_skip));
        }
        if self.emphasis != Emphasis::Original {
            fields.push(format!("Emphasis: {}", self.emphasis.a1111_name()));
        }
        if self.pad_conds {
            fields.push("Pad conds: True".to_string());
        }
        // sdfix's own field: A1111 has no tiled VAE in its core (extensions write their own).
        if self.vae_tiling {
            fields.push("VAE tiling: True".to_string());
        }
        if self.eta != 0.0 {
            fields.push(format!("Eta: {}", number(self.eta)));
        }
        if self.terminal_alpha_bar != "exact" {
            fields.push(format!("Terminal alpha_bar: {}", self.terminal_alpha_bar));
        }
        if self.sigma_range != "model" {
            fields.push(format!("Sigma range: {}", self.sigma_range));
        }
        fields.push(format!("Rescale CFG: {}", number(self.guidance_rescale)));
        let noise = if self.zero_snr { "Zero Terminal SNR" } else { "Default" };
        fields.push(format!("Noise Schedule: {noise}"));
        fields.push(format!("Prediction: {}", self.prediction));
        fields.push(format!("Version: {}", self.version));
        text.push('\n');
        text.push_str(&fields.join(", "));
        text
    }
}

/// An A1111 `parameters` text taken apart: prompt, negative prompt, and the `Key: value` fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Parameters {
    pub prompt: String,
    pub negative_prompt: String,
    pub fields: BTreeMap<String, String>,
}

/// Parses A1111 `parameters` as `infotext_utils.parse_generation_parameters` does: the last
/// line holds the `Key: value` fields (unless it has fewer than three, when it is prompt text); a
/// line starting with `Negative prompt:` starts the negative prompt; the lines before are the
/// prompt. A value in double quotes (`Lora hashes: "a: 1, b: 2"`) may hold commas and is
/// unquoted as JSON, as A1111's `unquote` does.
pub fn parse_parameters(text: &str) -> Parameters {
    let mut lines: Vec<&str> = text.trim().lines().collect();
    let last = lines.pop().unwrap_or_default();
    let mut pairs = parameter_pairs(last);
    if pairs.len() < 3 {
        lines.push(last);
        pairs.clear();
    }
    let (mut prompt, mut negative) = (Vec::new(), Vec::new());
    let mut in_negative = false;
    for line in lines {
        let mut line = line.trim();
        if let Some(rest) = line.strip_prefix("Negative prompt:") {
            in_negative = true;
            line = rest.trim();
        }
        if in_negative {
            negative.push(line);
        } else {
            prompt.push(line);
        }
    }
    Parameters {
        prompt: prompt.join("\n"),
        negative_prompt: negative.join("\n"),
        fields: pairs.into_iter().collect(),
    }
}

/// The `Key: value` pairs of an infotext's last line, read as A1111's `re_param`
/// (`\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)`) matches them: a key of word
/// characters, spaces, `-` and `/`; a value up to the next comma, or a quoted string.
fn parameter_pairs(line: &str) -> Vec<(String, String)> {
    let is_key_char = |c: char| c.is_alphanumeric() || c == '_' || c == ' ' || c == '-' || c == '/';
    let mut pairs = Vec::new();
    let mut rest = line;
    while !rest.trim().is_empty() {
        let trimmed = rest.trim_start();
        let key_len = trimmed.find(|c: char| !is_key_char(c)).unwrap_or(trimmed.len());
        let key = &trimmed[..key_len];
        let first_is_word = key.chars().next().is_some_and(|c| c.is_alphanumeric() || c == '_');
        let Some(after_colon) = trimmed[key_len..]
            .strip_prefix(':')
            .filter(|_| first_is_word && key.len() > 1)
        else {
            // Not a pair here: go on after the next comma (the regex would go on one character
            // later; on the lines A1111 and sdfix write, the two agree).
            match rest.split_once(',') {
                Some((_, after)) => {
                    rest = after;
                    continue;
                }
                None => break,
            }
        };
        let value_start = after_colon.trim_start();
        let quoted = value_start.strip_prefix('"').and_then(|inner| {
            let mut escaped = false;
            let end = inner.char_indices().find(|&(_, c)| {
                let closes = c == '"' && !escaped;
                escaped = c == '\\' && !escaped;
                closes
            })?;
            let literal = &value_start[..end.0 + 2];
            let tail = &value_start[end.0 + 2..];
            // The quoted form only counts when a comma or the end follows, as in the regex.
            let tail = tail.strip_prefix(',').or(tail.is_empty().then_some(tail))?;
            Some((
                serde_json::from_str::<String>(literal).unwrap_or_else(|_| literal.to_string()),
                tail,
            ))
        });
        let (value, tail) = match quoted {
            Some((value, tail)) => (value, tail),
            _ => match value_start.split_once(',') {
                Some((value, tail)) => (value.to_string(), tail),
                None => (value_start.to_string(), ""),
            },
        };
        pairs.push((key.trim().to_string(), value.trim().to_string()));
        rest = tail;
    }
    pairs
}
#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn example() -> ImageRecord {
        ImageRecord {
            version: "sdfix 0.1.0".into(),
            model: "ByteDance/sd2.1-base-zsnr-laionaes5".into(),
            revision: None,
            model_hash: None,
            loras: Vec::new(),
            prompt: "solid black background".into(),
            negative_prompt: "blurry".into(),
            seed: 1234,
            steps: 50,
            guidance: 7.5,
            guidance_rescale: 0.7,
            spacing: "trailing".into(),
            zero_snr: true,
            prediction: "v_prediction".into(),
            eta: 0.0,
            sampler: "ddim".into(),
            terminal_alpha_bar: "exact".into(),
            sigmas: "schedule".into(),
            sigma_range: "model".into(),
            width: 512,
            height: 512,
            dtype: "f16".into(),
            device: "cuda".into(),
            from_latents_file: false,
            scheduler: SchedulerRecord {
                beta_schedule: "scaled_linear".into(),
                beta_start: 0.00085,
                beta_end: 0.012,
                num_train_timesteps: 1000,
                trained_betas: false,
                steps_offset: 1,
                set_alpha_to_one: false,
                clip_sample: false,
                timesteps: vec![999, 979],
            },
            img2img: None,
            micro: Default::default(),
            encode_empty_negative: false,
            emphasis: Emphasis::Original,
            clip_skip: 1,
            pad_conds: false,
            vae_tiling: false,
            hires: None,
        }
    }

    /// img2img adds A1111's `Denoising strength` (and `Mask blur` when inpainting).
    #[test]
    fn img2img_fields_in_a1111_parameters() {
        let mut settings = example();
        settings.img2img = Some(crate::engine::record::Img2ImgRecord {
            init_image: "in.png".into(),
            init_image_sha256: "ab".into(),
            strength: 0.6,
            resize: "crop".into(),
            vae_encode: "sample".into(),
            mask: Some("mask.png".into()),
            mask_sha256: Some("cd".into()),
            mask_blur: Some(4.0),
            paste_back: true,
        });
        let text = settings.a1111_parameters();
        assert!(
            text.contains("Model: ByteDance/sd2.1-base-zsnr-laionaes5, Denoising strength: 0.6, Mask blur: 4, "),
            "{text}"
        );
        let fields = parse_parameters(&text).fields;
        assert_eq!(fields["Denoising strength"], "0.6");
    }

    #[test]
    fn quoted_values_and_short_last_lines_read_as_a1111() {
        let text = "a cat,\nin a hat\nNegative prompt: dog\n\
                    Steps: 28, Sampler: DPM++ 2M Karras, Lora hashes: \"a: 1a, b: 2b\", Size: 64x48, Note: \"say \\\"hi\\\"\"";
        let parsed = parse_parameters(text);
        assert_eq!(parsed.prompt, "a cat,\nin a hat");
        assert_eq!(parsed.negative_prompt, "dog");
        assert_eq!(parsed.fields["Lora hashes"], "a: 1a, b: 2b");
        assert_eq!(parsed.fields["Size"], "64x48");
        assert_eq!(parsed.fields["Note"], "say \"hi\"");
        assert_eq!(parsed.fields.len(), 5, "{:?}", parsed.fields);
        // Fewer than three pairs: the last line is prompt text (A1111's rule).
        let parsed = parse_parameters("a photo\nstyle: noir, mood: dark");
        assert_eq!(parsed.prompt, "a photo\nstyle: noir, mood: dark");
        assert!(parsed.fields.is_empty());
    }

    #[test]
    fn a1111_parameters_read_back() {
        let settings = example();
        let text = settings.a1111_parameters();
        assert!(
            text.ends_with(
                "Steps: 50, Sampler: DDIM, Schedule type: Trailing, CFG scale: 7.5, Seed: 1234, Size: 512x512, \
             Model: ByteDance/sd2.1-base-zsnr-laionaes5, Rescale CFG: 0.7, Noise Schedule: Zero Terminal SNR, \
             Prediction: v_prediction, Version: sdfix 0.1.0"
            ),
            "{text}"
        );
        let parsed = parse_parameters(&text);
        assert_eq!(parsed.prompt, "solid black background");
        assert_eq!(parsed.negative_prompt, "blurry");
        assert_eq!(parsed.fields["Seed"], "1234");
        assert_eq!(parsed.fields["Size"], "512x512");
    }

    #[test]
    fn a1111_sampler_names() {
        let mut settings = example();
        for (name, shown) in [
            ("euler_a", "Sampler: Euler a,"),
            ("dpmpp_2m", "Sampler: DPM++ 2M,"),
            ("dpmpp_2m_sde", "Sampler: DPM++ 2M SDE,"),
            ("euler", "Sampler: Euler,"),
        ] {
            settings.sampler = name.into();
            let text = settings.a1111_parameters();
            assert!(text.contains(shown), "{text}");
        }
    }

    /// DDIM images carry no `sampler` key (their bytes are as before samplers existed), and
    /// settings without one read back as ddim.
    #[test]
    fn ddim_and_exact_are_implied() {
        let settings = example();
        let json = serde_json::to_string(&settings).unwrap();
        assert!(
            !json.contains("sampler") && !json.contains("terminal_alpha_bar"),
            "{json}"
        );
        let mut euler = example();
        euler.sampler = "euler".into();
        euler.terminal_alpha_bar = "diffusers".into();
        euler.sigmas = "karras".into();
        assert!(euler.a1111_parameters().contains("Schedule type: Karras,"));
        let json = serde_json::to_string(&euler).unwrap();
        assert_eq!(serde_json::from_str::<ImageRecord>(&json).unwrap(), euler);
    }

    #[test]
    fn model_and_lora_hashes_as_a1111_writes_them() {
        let mut settings = example();
        settings.model_hash = Some("0123456789".into());
        settings.loras = vec![crate::engine::record::LoraSetting {
            name: "detail".into(),
            hash: "abcdef012345".into(),
            weight: 0.8,
        }];
        let text = settings.a1111_parameters();
        assert!(
            text.contains("Size: 512x512, Model hash: 0123456789, Model: ByteDance/sd2.1-base-zsnr-laionaes5, "),
            "{text}"
        );
        assert!(text.contains(", Lora hashes: \"detail: abcdef012345\", "), "{text}");
        let json = serde_json::to_string(&settings).unwrap();
        assert_eq!(serde_json::from_str::<ImageRecord>(&json).unwrap(), settings);
        assert!(!serde_json::to_string(&example()).unwrap().contains("model_hash"));
    }

    #[test]
    fn settings_round_trip_through_json() {
        let settings = example();
        let json = serde_json::to_string(&settings).unwrap();
        assert_eq!(serde_json::from_str::<ImageRecord>(&json).unwrap(), settings);
    }
}
