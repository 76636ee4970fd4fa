//! One all-optional form of a [`Request`]'s settings, which every source of per-request settings
//! deserializes into and applies onto the command line's: a prompt-file line (`.jsonl`), an
//! API body (`/sdapi/v1/txt2img`, with AUTOMATIC1111's names as aliases: `cfg_scale`,
//! `denoising_strength`), and the settings a PNG records (`generate --from-image`,
//! [`Overrides::from_record`]).
//!
//! Keys are [`Field::key`]s, values as the command line takes them (`"sampler": "euler_a"`); a
//! value that does not parse names its key. Pictures and LoRAs are references (a path, or a
//! server's base64) that the front end turns into inputs ([`InputReader`]). Unknown keys are
//! ignored here: a prompt file refuses them ([`Overrides::parse_object`] with `known_only`), a server takes the many
//! fields AUTOMATIC1111 clients send.

use std::sync::Arc;

use serde::{Deserialize, Deserializer};

use super::field::{Field, RequestError};
use super::hires::{HiresResize, HiresUpscaler};
use super::init_image::{InitImage, MaskImage, ResizeMode, VaeEncodeMode};
use super::micro::{CropCorner, PixelSize};
use super::record::ImageRecord;
use super::request::Request;
use crate::prompt::Emphasis;
use crate::sampling::{Prediction, Sampler};
use crate::schedule::{SigmaRange, SigmaSchedule, TerminalAlphaBar, TimestepSpacing};
use crate::weights::lora::Loras;

/// Every setting of a [`Request`], each optional: `None` keeps what it is applied onto.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Overrides {
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
    pub seed: Option<u64>,
    pub num_images: Option<usize>,
    pub steps: Option<usize>,
    #[serde(alias = "cfg_scale")]
    pub guidance: Option<f64>,
    pub guidance_rescale: Option<f64>,
    #[serde(default, deserialize_with = "parsed")]
    pub spacing: Option<TimestepSpacing>,
    pub zero_snr: Option<bool>,
    #[serde(default, deserialize_with = "parsed")]
    pub prediction: Option<Prediction>,
    pub steps_offset: Option<usize>,
    pub eta: Option<f64>,
    #[serde(default, deserialize_with = "parsed")]
    pub sampler: Option<Sampler>,
    #[serde(default, deserialize_with = "parsed")]
    pub terminal_alpha_bar: Option<TerminalAlphaBar>,
    #[serde(default, deserialize_with = "parsed")]
    pub sigmas: Option<SigmaSchedule>,
    #[serde(default, deserialize_with = "parsed")]
    pub sigma_range: Option<SigmaRange>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// img2img's picture: a path (relative to a prompt file) or a server's base64.
    pub init_image: Option<String>,
    #[serde(alias = "denoising_strength")]
    pub strength: Option<f64>,
    /// Inpainting's mask, a reference as `init_image`.
    pub mask: Option<String>,
    pub mask_blur: Option<f64>,
    pub paste_back: Option<bool>,
    #[serde(default, deserialize_with = "parsed")]
    pub resize: Option<ResizeMode>,
    #[serde(default, deserialize_with = "parsed")]
    pub vae_encode: Option<VaeEncodeMode>,
    /// `FILE[:WEIGHT]` entries as `--lora` takes them: this request's LoRA set instead of the
    /// engine's (`[]`: none).
    #[serde(default, deserialize_with = "lora_list")]
    pub loras: Option<Vec<String>>,
    #[serde(default, deserialize_with = "parsed")]
    pub original_size: Option<PixelSize>,
    #[serde(default, deserialize_with = "parsed")]
    pub crop_top_left: Option<CropCorner>,
    #[serde(default, deserialize_with = "parsed")]
    pub target_size: Option<PixelSize>,
    #[serde(default, deserialize_with = "parsed")]
    pub negative_original_size: Option<PixelSize>,
    #[serde(default, deserialize_with = "parsed")]
    pub negative_crop_top_left: Option<CropCorner>,
    #[serde(default, deserialize_with = "parsed")]
    pub negative_target_size: Option<PixelSize>,
    pub encode_empty_negative: Option<bool>,
    #[serde(default, deserialize_with = "parsed")]
    pub emphasis: Option<Emphasis>,
    /// A1111's name is its option's, `CLIP_stop_at_last_layers` (`override_settings`).
    #[serde(alias = "CLIP_stop_at_last_layers")]
    pub clip_skip: Option<usize>,
    pub pad_conds: Option<bool>,
    /// An sdfix setting: A1111 has no tiled VAE of its own.
    pub vae_tiling: Option<bool>,
    pub hires_scale: Option<f64>,
    #[serde(default, deserialize_with = "parsed")]
    pub hires_size: Option<HiresResize>,
    #[serde(default, deserialize_with = "parsed")]
    pub hires_upscaler: Option<HiresUpscaler>,
    pub hires_steps: Option<usize>,
    pub hires_strength: Option<f64>,
    pub hires_prompt: Option<String>,
    pub hires_negative_prompt: Option<String>,
    #[serde(default, deserialize_with = "parsed")]
    pub hires_sampler: Option<Sampler>,
}

/// A string value parsed by its type's `FromStr` (`"spacing": "leading"`, `"sampler": "euler"`).
pub(crate) fn parsed<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    Option::<String>::deserialize(d)?
        .map(|s| s.parse().map_err(serde::de::Error::custom))
        .transpose()
}

/// `loras`: a list of strings, with an example in the error (serde's own would not have one).
fn lora_list<'de, D>(d: D) -> Result<Option<Vec<String>>, D::Error>
where
    D: Deserializer<'de>,
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
            "expected a list of \"FILE[:WEIGHT]\" strings, as [\"style.safetensors:0.8\"], not {value}"
        ))
    })
}

/// Turns the references of [`Overrides`] into inputs: files relative to a prompt file, a PNG's
/// recorded pictures (checked by hash), a server's base64.
pub trait InputReader {
    fn init_image(&mut self, reference: &str) -> anyhow::Result<Arc<InitImage>>;
    fn mask(&mut self, reference: &str) -> anyhow::Result<Arc<MaskImage>>;
    fn loras(&mut self, list: &[String]) -> anyhow::Result<Arc<Loras>>;
}

impl Overrides {
    /// Parses one JSON object, naming the key of a value that does not parse; `known_only`
    /// also refuses keys that are no setting (a prompt file's typo must not pass silently).
    pub fn parse_object(value: serde_json::Value, known_only: bool) -> Result<Self, String> {
        let mut unknown = Vec::new();
        let mut note_unknown = |path: serde_ignored::Path| unknown.push(path.to_string());
        let overrides: Self =
            serde_path_to_error::deserialize(serde_ignored::Deserializer::new(value, &mut note_unknown)).map_err(
                |e| {
                    let path = e.path().to_string();
                    match path.as_str() {
                        "." | "?" => e.inner().to_string(),
                        _ => format!("\"{path}\": {}", e.inner()),
                    }
                },
            )?;
        if known_only && !unknown.is_empty() {
            // Initial latents are the command line's alone (`--latents`, `--hires-latents`).
            let keys: Vec<&str> = Field::ALL
                .iter()
                .filter(|&&f| f != Field::Latents && f != Field::HiresLatents)
                .map(|f| f.key())
                .collect();
            return Err(format!(
                "unknown key {}; the keys are {}",
                unknown
                    .iter()
                    .map(|k| format!("\"{k}\""))
                    .collect::<Vec<_>>()
                    .join(", "),
                keys.join(", ")
            ));
        }
        Ok(overrides)
    }

    /// Sets every setting this names on `request`, reading its pictures and LoRAs with `reader`.
    pub fn apply(&self, request: &mut Request, reader: &mut dyn InputReader) -> Result<(), RequestError> {
        fn set<T: Clone>(target: &mut T, value: &Option<T>) {
            if let Some(v) = value {
                *target = v.clone();
            }
        }
        fn set_some<T: Clone>(target: &mut Option<T>, value: &Option<T>) {
            if value.is_some() {
                target.clone_from(value);
            }
        }
        set(&mut request.prompt, &self.prompt);
        set(&mut request.negative_prompt, &self.negative_prompt);
        set(&mut request.seed, &self.seed);
        set_some(&mut request.num_images, &self.num_images);
        set(&mut request.steps, &self.steps);
        set(&mut request.guidance, &self.guidance);
        set(&mut request.guidance_rescale, &self.guidance_rescale);
        set(&mut request.spacing, &self.spacing);
        set_some(&mut request.zero_snr, &self.zero_snr);
        set_some(&mut request.prediction, &self.prediction);
        set_some(&mut request.steps_offset, &self.steps_offset);
        set(&mut request.eta, &self.eta);
        set(&mut request.sampler, &self.sampler);
        set(&mut request.terminal_alpha_bar, &self.terminal_alpha_bar);
        set(&mut request.sigmas, &self.sigmas);
        set(&mut request.sigma_range, &self.sigma_range);
        set_some(&mut request.width, &self.width);
        set_some(&mut request.height, &self.height);
        set_some(&mut request.strength, &self.strength);
        set_some(&mut request.mask_blur, &self.mask_blur);
        set(&mut request.paste_back, &self.paste_back);
        set(&mut request.resize, &self.resize);
        set(&mut request.vae_encode, &self.vae_encode);
        let micro = &mut request.micro;
        set_some(&mut micro.original_size, &self.original_size);
        set_some(&mut micro.crop_top_left, &self.crop_top_left);
        set_some(&mut micro.target_size, &self.target_size);
        set_some(&mut micro.negative_original_size, &self.negative_original_size);
        set_some(&mut micro.negative_crop_top_left, &self.negative_crop_top_left);
        set_some(&mut micro.negative_target_size, &self.negative_target_size);
        set(&mut request.encode_empty_negative, &self.encode_empty_negative);
        set(&mut request.emphasis, &self.emphasis);
        set(&mut request.clip_skip, &self.clip_skip);
        set(&mut request.pad_conds, &self.pad_conds);
        set(&mut request.vae_tiling, &self.vae_tiling);
        // A scale or a size replaces the hires size the request had (they exclude each other;
        // both in one place is refused by the engine).
        if self.hires_scale.is_some() || self.hires_size.is_some() {
            (request.hires.scale, request.hires.size) = (self.hires_scale, self.hires_size);
        }
        set_some(&mut request.hires.upscaler, &self.hires_upscaler);
        set_some(&mut request.hires.steps, &self.hires_steps);
        set_some(&mut request.hires.strength, &self.hires_strength);
        set_some(&mut request.hires.prompt, &self.hires_prompt);
        set_some(&mut request.hires.negative_prompt, &self.hires_negative_prompt);
        set_some(&mut request.hires.sampler, &self.hires_sampler);
        let failed = |field: Field| move |e: anyhow::Error| RequestError::new(field, format!("{e:#}"));
        if let Some(reference) = &self.init_image {
            request.init_image = Some(reader.init_image(reference).map_err(failed(Field::InitImage))?);
        }
        if let Some(reference) = &self.mask {
            request.mask = Some(reader.mask(reference).map_err(failed(Field::Mask))?);
        }
        if let Some(list) = &self.loras {
            request.loras = Some(reader.loras(list).map_err(failed(Field::Loras))?);
        }
        Ok(())
    }

    /// Everything `record` says an image was made with, to make it again: every setting set,
    /// its pictures named as recorded (the reader finds and checks them). The LoRAs are
    /// recorded by name and hash only, so they are not here.
    pub fn from_record(record: &ImageRecord) -> Result<Self, RequestError> {
        fn parse<T: std::str::FromStr<Err = String>>(field: Field, value: &str) -> Result<Option<T>, RequestError> {
            value.parse().map(Some).map_err(|e| RequestError::new(field, e))
        }
        let img2img = record.img2img.as_ref();
        Ok(Self {
            prompt: Some(record.prompt.clone()),
            negative_prompt: Some(record.negative_prompt.clone()),
            seed: Some(record.seed),
            num_images: Some(1),
            steps: Some(record.steps),
            guidance: Some(record.guidance),
            guidance_rescale: Some(record.guidance_rescale),
            spacing: parse(Field::Spacing, &record.spacing)?,
            zero_snr: Some(record.zero_snr),
            prediction: parse(Field::Prediction, &record.prediction)?,
            steps_offset: Some(record.scheduler.steps_offset),
            eta: Some(record.eta),
            sampler: parse(Field::Sampler, &record.sampler)?,
            terminal_alpha_bar: parse(Field::TerminalAlphaBar, &record.terminal_alpha_bar)?,
            sigmas: parse(Field::Sigmas, &record.sigmas)?,
            sigma_range: parse(Field::SigmaRange, &record.sigma_range)?,
            width: Some(record.width),
            height: Some(record.height),
            init_image: img2img.map(|i| i.init_image.clone()),
            strength: img2img.map(|i| i.strength),
            mask: img2img.and_then(|i| i.mask.clone()),
            mask_blur: img2img.and_then(|i| i.mask_blur),
            paste_back: Some(img2img.is_none_or(|i| i.paste_back)),
            resize: img2img.map_or(Ok(None), |i| parse(Field::Resize, &i.resize))?,
            vae_encode: img2img.map_or(Ok(None), |i| parse(Field::VaeEncode, &i.vae_encode))?,
            loras: None,
            original_size: record.micro.original_size,
            crop_top_left: record.micro.crop_top_left,
            target_size: record.micro.target_size,
            negative_original_size: record.micro.negative_original_size,
            negative_crop_top_left: record.micro.negative_crop_top_left,
            negative_target_size: record.micro.negative_target_size,
            encode_empty_negative: Some(record.encode_empty_negative),
            emphasis: Some(record.emphasis),
            clip_skip: Some(record.clip_skip),
            pad_conds: Some(record.pad_conds),
            vae_tiling: Some(record.vae_tiling),
            hires_scale: record.hires.as_ref().and_then(|h| h.scale),
            hires_size: record.hires.as_ref().and_then(|h| h.size),
            hires_upscaler: record
                .hires
                .as_ref()
                .map_or(Ok(None), |h| parse(Field::HiresUpscaler, &h.upscaler))?,
            hires_steps: record.hires.as_ref().map(|h| h.steps),
            hires_strength: record.hires.as_ref().map(|h| h.strength),
            hires_prompt: record.hires.as_ref().and_then(|h| h.prompt.clone()),
            hires_negative_prompt: record.hires.as_ref().and_then(|h| h.negative_prompt.clone()),
            hires_sampler: match record.hires.as_ref().and_then(|h| h.sampler.as_deref()) {
                Some(name) => parse(Field::HiresSampler, name)?,
                None => None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_that_do_not_parse_name_their_key() {
        let err = Overrides::parse_object(json!({"sampler": "heun"}), true).unwrap_err();
        assert!(err.starts_with("\"sampler\": unknown sampler \"heun\""), "{err}");
        let err = Overrides::parse_object(json!({"steps": "ten"}), true).unwrap_err();
        assert!(err.starts_with("\"steps\": "), "{err}");
        let err = Overrides::parse_object(json!({"colour": "red"}), true).unwrap_err();
        assert!(err.starts_with("unknown key \"colour\""), "{err}");
        assert!(Overrides::parse_object(json!({"colour": "red"}), false).is_ok());
    }

    /// Every setting has its key here: a [`Field`] added without its override is caught. The
    /// initial latents are the command line's alone (`--latents`, a tensor file for one prompt).
    #[test]
    fn every_field_is_a_key_of_the_overrides() {
        for field in Field::ALL
            .into_iter()
            .filter(|&f| f != Field::Latents && f != Field::HiresLatents)
        {
            let value = json!({ field.key(): null });
            assert!(
                Overrides::parse_object(value, true).is_ok(),
                "{} is no key of Overrides",
                field.key()
            );
        }
    }

    #[test]
    fn a1111_names_are_aliases() {
        let o = Overrides::parse_object(json!({"cfg_scale": 5, "denoising_strength": 0.5}), false).unwrap();
        assert_eq!((o.guidance, o.strength), (Some(5.0), Some(0.5)));
    }
}
