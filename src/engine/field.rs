//! The settings of a [`Request`](super::Request) by name, and the typed error that names the one
//! a request got wrong.
//!
//! Each front end names a setting in its own words: the command line by its flag (`--steps`), a
//! prompt-file line by its JSON key (`"steps"`), the server by AUTOMATIC1111's field (`steps`,
//! `cfg_scale`). The engine says which [`Field`] and why; [`RequestError::render`] writes it in
//! the caller's words, so no front end rewrites another's messages.

use std::fmt;

/// A setting of a request. Its names: [`Field::flag`], [`Field::key`], [`Field::api_name`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    Prompt,
    NegativePrompt,
    Seed,
    NumImages,
    Steps,
    Guidance,
    GuidanceRescale,
    Spacing,
    ZeroSnr,
    Prediction,
    StepsOffset,
    Eta,
    Sampler,
    TerminalAlphaBar,
    Sigmas,
    SigmaRange,
    Width,
    Height,
    Latents,
    InitImage,
    Strength,
    Mask,
    MaskBlur,
    PasteBack,
    Resize,
    VaeEncode,
    Loras,
    OriginalSize,
    CropTopLeft,
    TargetSize,
    NegativeOriginalSize,
    NegativeCropTopLeft,
    NegativeTargetSize,
    EncodeEmptyNegative,
    Emphasis,
    ClipSkip,
    PadConds,
    VaeTiling,
    HiresScale,
    HiresSize,
    HiresUpscaler,
    HiresSteps,
    HiresStrength,
    HiresPrompt,
    HiresNegativePrompt,
    HiresSampler,
    HiresLatents,
}

impl Field {
    pub const ALL: [Field; 47] = [
        Self::Prompt,
        Self::NegativePrompt,
        Self::Seed,
        Self::NumImages,
        Self::Steps,
        Self::Guidance,
        Self::GuidanceRescale,
        Self::Spacing,
        Self::ZeroSnr,
        Self::Prediction,
        Self::StepsOffset,
        Self::Eta,
        Self::Sampler,
        Self::TerminalAlphaBar,
        Self::Sigmas,
        Self::SigmaRange,
        Self::Width,
        Self::Height,
        Self::Latents,
        Self::InitImage,
        Self::Strength,
        Self::Mask,
        Self::MaskBlur,
        Self::PasteBack,
        Self::Resize,
        Self::VaeEncode,
        Self::Loras,
        Self::OriginalSize,
        Self::CropTopLeft,
        Self::TargetSize,
        Self::NegativeOriginalSize,
        Self::NegativeCropTopLeft,
        Self::NegativeTargetSize,
        Self::EncodeEmptyNegative,
        Self::Emphasis,
        Self::ClipSkip,
        Self::PadConds,
        Self::VaeTiling,
        Self::HiresScale,
        Self::HiresSize,
        Self::HiresUpscaler,
        Self::HiresSteps,
        Self::HiresStrength,
        Self::HiresPrompt,
        Self::HiresNegativePrompt,
        Self::HiresSampler,
        Self::HiresLatents,
    ];

    /// The key of prompt-file lines, of the overrides and of the image's recorded settings.
    pub fn key(self) -> &'static str {
        match self {
            Self::Prompt => "prompt",
            Self::NegativePrompt => "negative_prompt",
            Self::Seed => "seed",
            Self::NumImages => "num_images",
            Self::Steps => "steps",
            Self::Guidance => "guidance",
            Self::GuidanceRescale => "guidance_rescale",
            Self::Spacing => "spacing",
            Self::ZeroSnr => "zero_snr",
            Self::Prediction => "prediction",
            Self::StepsOffset => "steps_offset",
            Self::Eta => "eta",
            Self::Sampler => "sampler",
            Self::TerminalAlphaBar => "terminal_alpha_bar",
            Self::Sigmas => "sigmas",
            Self::SigmaRange => "sigma_range",
            Self::Width => "width",
            Self::Height => "height",
            Self::Latents => "latents",
            Self::InitImage => "init_image",
            Self::Strength => "strength",
            Self::Mask => "mask",
            Self::MaskBlur => "mask_blur",
            Self::PasteBack => "paste_back",
            Self::Resize => "resize",
            Self::VaeEncode => "vae_encode",
            Self::Loras => "loras",
            Self::OriginalSize => "original_size",
            Self::CropTopLeft => "crop_top_left",
            Self::TargetSize => "target_size",
            Self::NegativeOriginalSize => "negative_original_size",
            Self::NegativeCropTopLeft => "negative_crop_top_left",
            Self::NegativeTargetSize => "negative_target_size",
            Self::EncodeEmptyNegative => "encode_empty_negative",
            Self::Emphasis => "emphasis",
            Self::ClipSkip => "clip_skip",
            Self::PadConds => "pad_conds",
            Self::VaeTiling => "vae_tiling",
            Self::HiresScale => "hires_scale",
            Self::HiresSize => "hires_size",
            Self::HiresUpscaler => "hires_upscaler",
            Self::HiresSteps => "hires_steps",
            Self::HiresStrength => "hires_strength",
            Self::HiresPrompt => "hires_prompt",
            Self::HiresNegativePrompt => "hires_negative_prompt",
            Self::HiresSampler => "hires_sampler",
            Self::HiresLatents => "hires_latents",
        }
    }

    /// The command-line flag: the key with dashes (`--lora` for the LoRA list, `--zero-snr`
    /// whose off switch is `--no-zero-snr`, `--no-paste-back`).
    pub fn flag(self) -> String {
        match self {
            Self::Loras => "--lora".to_string(),
            key => format!("--{}", key.key().replace('_', "-")),
        }
    }

    /// AUTOMATIC1111's name in `/sdapi/v1/txt2img` and `/img2img` bodies where it has one
    /// (`cfg_scale`, `denoising_strength`, ...); otherwise the key, which the server takes too.
    pub fn api_name(self) -> &'static str {
        match self {
            Self::Guidance => "cfg_scale",
            Self::Strength => "denoising_strength",
            Self::InitImage => "init_images",
            Self::Sampler => "sampler_name",
            Self::Sigmas => "scheduler",
            Self::Resize => "resize_mode",
            Self::NumImages => "batch_size",
            // A1111 takes it in `override_settings`, as its option's name.
            Self::ClipSkip => "CLIP_stop_at_last_layers",
            // The hires fix's, with `enable_hr` (`denoising_strength` is img2img's otherwise).
            Self::HiresScale => "hr_scale",
            Self::HiresSize => "hr_resize_x/hr_resize_y",
            Self::HiresUpscaler => "hr_upscaler",
            Self::HiresSteps => "hr_second_pass_steps",
            Self::HiresStrength => "denoising_strength",
            Self::HiresPrompt => "hr_prompt",
            Self::HiresNegativePrompt => "hr_negative_prompt",
            Self::HiresSampler => "hr_sampler_name",
            key => key.key(),
        }
    }

    /// Whether the setting is a switch (`--zero-snr` / `--no-zero-snr`).
    fn is_switch(self) -> bool {
        matches!(
            self,
            Self::ZeroSnr | Self::PasteBack | Self::EncodeEmptyNegative | Self::PadConds | Self::VaeTiling
        )
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

/// Which front end's words a [`RequestError`] is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Words {
    /// `--steps 0`, `--no-zero-snr`.
    Flags,
    /// `"steps": 0`, `"zero_snr": false` (prompt-file lines).
    Keys,
    /// `steps: 0`, `cfg_scale: 7` (the server's request bodies).
    Api,
}

impl Words {
    /// How `field` (with `value` when given) reads in these words.
    fn name(self, field: Field, value: Option<&str>) -> String {
        match (self, value) {
            (Self::Flags, Some("true")) if field.is_switch() => field.flag(),
            (Self::Flags, Some("false")) if field.is_switch() => format!("--no-{}", &field.flag()[2..]),
            (Self::Flags, Some(v)) => format!("{} {v}", field.flag()),
            (Self::Flags, None) => field.flag(),
            (Self::Keys, Some(v)) => format!("\"{}\": {}", field.key(), json_value(v)),
            (Self::Keys, None) => format!("\"{}\"", field.key()),
            (Self::Api, Some(v)) => format!("{}: {}", field.api_name(), json_value(v)),
            (Self::Api, None) => field.api_name().to_string(),
        }
    }
}

/// `v` as it is written in JSON: numbers and booleans bare, anything else quoted.
fn json_value(v: &str) -> String {
    if v == "true" || v == "false" || v.parse::<f64>().is_ok() {
        v.to_string()
    } else {
        format!("{v:?}")
    }
}

/// A request the engine cannot make: which setting and why.
///
/// `reason` follows the field's name ("2000 must be between 1 and 1000 ..."); other settings it
/// mentions are written `{key}` or `{key=value}` (`{prediction=v_prediction}`), and
/// [`RequestError::render`] writes each in the caller's words: `--prediction v_prediction`,
/// `"prediction": "v_prediction"` or `prediction: "v_prediction"`.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestError {
    pub field: Field,
    pub reason: String,
}

impl RequestError {
    pub fn new(field: Field, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }

    /// The message in `words`: the field's name (`--steps`, `"steps":`, `steps:`), then the
    /// reason with its references named.
    pub fn render(&self, words: Words) -> String {
        let name = match words {
            Words::Flags => self.field.flag(),
            Words::Keys => format!("\"{}\":", self.field.key()),
            Words::Api => format!("{}:", self.field.api_name()),
        };
        format!("{name} {}", render_references(&self.reason, words))
    }

    /// [`RequestError::render`] in `words` with the field named `name` (a server's own spelling
    /// of it, e.g. `init_images[0]`).
    pub fn render_as(&self, name: &str, words: Words) -> String {
        format!("{name}: {}", render_references(&self.reason, words))
    }
}

/// `text` with every `{key}` / `{key=value}` of a known field written in `words`; anything else
/// in braces is left as it is.
fn render_references(text: &str, words: Words) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            out.push_str(&rest[open..]);
            return out;
        };
        let inner = &after[..close];
        let (key, value) = match inner.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (inner, None),
        };
        match Field::ALL.iter().find(|f| f.key() == key) {
            Some(&field) => out.push_str(&words.name(field, value)),
            None => {
                out.push('{');
                out.push_str(inner);
                out.push('}');
            }
        }
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

/// Something the user of a request should know that is not an error (a config that asks for what
/// cannot work, a picture fitted to another size), with the settings it mentions written `{key}`
/// or `{key=value}` as in a [`RequestError`]'s reason, for each front end to word.
#[derive(Debug, Clone, PartialEq)]
pub struct Warning(pub String);

impl Warning {
    /// The text with the settings it mentions in `words`.
    pub fn render(&self, words: Words) -> String {
        render_references(&self.0, words)
    }
}

impl fmt::Display for Warning {
    /// In flags: what a library user most often runs beside it is the command line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(Words::Flags))
    }
}

impl fmt::Display for RequestError {
    /// In keys: a library user sees the overrides' names.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(Words::Keys))
    }
}

impl std::error::Error for RequestError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_front_end_names_the_field_its_way() {
        let err = RequestError::new(
            Field::ZeroSnr,
            "needs a v_prediction model; pass {zero_snr=false} or {prediction=v_prediction}",
        );
        assert_eq!(
            err.render(Words::Flags),
            "--zero-snr needs a v_prediction model; pass --no-zero-snr or --prediction v_prediction"
        );
        assert_eq!(
            err.render(Words::Keys),
            "\"zero_snr\": needs a v_prediction model; pass \"zero_snr\": false or \"prediction\": \"v_prediction\""
        );
        assert_eq!(
            err.render(Words::Api),
            "zero_snr: needs a v_prediction model; pass zero_snr: false or prediction: \"v_prediction\""
        );
        let err = RequestError::new(Field::Guidance, "-1 must not be negative");
        assert_eq!(err.render(Words::Api), "cfg_scale: -1 must not be negative");
        assert_eq!(err.render(Words::Flags), "--guidance -1 must not be negative");
    }

    #[test]
    fn warnings_are_worded_like_errors() {
        let w = Warning("warning: {sigmas=karras} needs a finite sigma_max; using {terminal_alpha_bar=comfy}".into());
        assert_eq!(
            w.render(Words::Flags),
            "warning: --sigmas karras needs a finite sigma_max; using --terminal-alpha-bar comfy"
        );
        assert_eq!(
            w.render(Words::Api),
            "warning: scheduler: \"karras\" needs a finite sigma_max; using terminal_alpha_bar: \"comfy\""
        );
    }

    #[test]
    fn names_are_distinct_and_braces_that_name_nothing_stay() {
        let keys: std::collections::HashSet<_> = Field::ALL.iter().map(|f| f.key()).collect();
        assert_eq!(keys.len(), Field::ALL.len());
        assert_eq!(Field::Loras.flag(), "--lora");
        assert_eq!(Field::TerminalAlphaBar.flag(), "--terminal-alpha-bar");
        assert_eq!(
            render_references("a {b} {steps=4} {", Words::Flags),
            "a {b} --steps 4 {"
        );
    }
}
