//! SDXL's micro-conditioning: the sizes and crop the UNet is told about besides the text
//! (`add_time_ids = original_size + crops_coords_top_left + target_size`, SDXL paper section 2.2),
//! with diffusers' defaults: the picture's own size, no crop, and the negative branch the same as
//! the positive unless both negative sizes are given (`StableDiffusionXLPipeline.__call__`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::field::{Field, RequestError};

/// A size in pixels, written `WxH` as `--width`/`--height` give it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PixelSize {
    pub width: usize,
    pub height: usize,
}

/// `WxH` (or `WXH`, spaces around either number allowed) as two whole numbers, any of them 0;
/// what a 0 means is the caller's rule ([`PixelSize`], `HiresResize`).
pub(super) fn parse_width_x_height(s: &str) -> Option<(usize, usize)> {
    let (width, height) = s.split_once(['x', 'X'])?;
    Some((width.trim().parse().ok()?, height.trim().parse().ok()?))
}

impl FromStr for PixelSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match parse_width_x_height(s) {
            Some((width, height)) if width > 0 && height > 0 => Ok(Self { width, height }),
            _ => Err(format!(
                "{s:?} is not a size: write WIDTHxHEIGHT in pixels, e.g. 1024x1024"
            )),
        }
    }
}

impl fmt::Display for PixelSize {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

/// A crop's top-left corner in pixels, written `X,Y` (X from the left, Y from the top).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CropCorner {
    pub x: usize,
    pub y: usize,
}

impl FromStr for CropCorner {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.split_once(',')
            .and_then(|(x, y)| {
                Some(Self {
                    x: x.trim().parse().ok()?,
                    y: y.trim().parse().ok()?,
                })
            })
            .ok_or_else(|| format!("{s:?} is not a corner: write X,Y in pixels from the top left, e.g. 0,0"))
    }
}

impl fmt::Display for CropCorner {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{},{}", self.x, self.y)
    }
}

macro_rules! serde_as_string {
    ($type:ty) => {
        impl Serialize for $type {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $type {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_as_string!(PixelSize);
serde_as_string!(CropCorner);

/// The micro-conditioning a request sets; `None` takes diffusers' default. Recorded as set (so a
/// picture made again at another size gets that size's defaults).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MicroConditioning {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_size: Option<PixelSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crop_top_left: Option<CropCorner>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_size: Option<PixelSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_original_size: Option<PixelSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_crop_top_left: Option<CropCorner>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_target_size: Option<PixelSize>,
}

/// One branch's time ids: original (h, w), crop (top, left), target (h, w), diffusers' order.
pub type TimeIds = [f64; 6];

fn time_ids(original: PixelSize, crop: CropCorner, target: PixelSize) -> TimeIds {
    [
        original.height as f64,
        original.width as f64,
        crop.y as f64,
        crop.x as f64,
        target.height as f64,
        target.width as f64,
    ]
}

impl MicroConditioning {
    /// Whether any value is set.
    pub fn is_set(&self) -> bool {
        *self != Self::default()
    }

    /// The setting that is set, for "only SDXL takes this" errors.
    pub fn first_set_field(&self) -> Option<Field> {
        [
            (self.original_size.is_some(), Field::OriginalSize),
            (self.crop_top_left.is_some(), Field::CropTopLeft),
            (self.target_size.is_some(), Field::TargetSize),
            (self.negative_original_size.is_some(), Field::NegativeOriginalSize),
            (self.negative_crop_top_left.is_some(), Field::NegativeCropTopLeft),
            (self.negative_target_size.is_some(), Field::NegativeTargetSize),
        ]
        .into_iter()
        .find_map(|(set, field)| set.then_some(field))
    }

    /// diffusers uses the negative values only as a set: both sizes, and the crop with them.
    pub fn check(&self) -> Result<(), RequestError> {
        let both = "the negative branch takes its own values only with both negative sizes (diffusers' rule), otherwise the prompt's";
        let (field, missing) = match (self.negative_original_size, self.negative_target_size) {
            (Some(_), None) => (
                Field::NegativeOriginalSize,
                format!("{{{}}}", Field::NegativeTargetSize.key()),
            ),
            (None, Some(_)) => (
                Field::NegativeTargetSize,
                format!("{{{}}}", Field::NegativeOriginalSize.key()),
            ),
            (None, None) if self.negative_crop_top_left.is_some() => (
                Field::NegativeCropTopLeft,
                format!(
                    "{{{}}} and {{{}}}",
                    Field::NegativeOriginalSize.key(),
                    Field::NegativeTargetSize.key()
                ),
            ),
            _ => return Ok(()),
        };
        Err(RequestError::new(field, format!("needs {missing} too: {both}")))
    }

    /// The (positive, negative) time ids for a picture of `size`.
    pub fn time_ids(&self, size: PixelSize) -> (TimeIds, TimeIds) {
        let positive = time_ids(
            self.original_size.unwrap_or(size),
            self.crop_top_left.unwrap_or_default(),
            self.target_size.unwrap_or(size),
        );
        let negative = match (self.negative_original_size, self.negative_target_size) {
            (Some(original), Some(target)) => {
                time_ids(original, self.negative_crop_top_left.unwrap_or_default(), target)
            }
            _ => positive,
        };
        (positive, negative)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_picture_size_and_no_crop() {
        let size = PixelSize { width: 48, height: 32 };
        let (positive, negative) = MicroConditioning::default().time_ids(size);
        assert_eq!(positive, [32.0, 48.0, 0.0, 0.0, 32.0, 48.0]);
        assert_eq!(negative, positive);
    }

    #[test]
    fn values_are_in_diffusers_order() {
        let micro = MicroConditioning {
            original_size: Some("24x40".parse().unwrap()),
            crop_top_left: Some("2,4".parse().unwrap()),
            target_size: Some("48x32".parse().unwrap()),
            negative_original_size: Some("64x64".parse().unwrap()),
            negative_crop_top_left: None,
            negative_target_size: Some("32x16".parse().unwrap()),
        };
        let (positive, negative) = micro.time_ids(PixelSize { width: 8, height: 8 });
        assert_eq!(positive, [40.0, 24.0, 4.0, 2.0, 32.0, 48.0]);
        assert_eq!(negative, [64.0, 64.0, 0.0, 0.0, 16.0, 32.0]);
    }

    #[test]
    fn a_lone_negative_size_is_refused() {
        let micro = MicroConditioning {
            negative_target_size: Some("8x8".parse().unwrap()),
            ..Default::default()
        };
        let err = micro.check().unwrap_err();
        assert_eq!(err.field, Field::NegativeTargetSize);
        assert!("0x8".parse::<PixelSize>().is_err());
        assert!("8,".parse::<CropCorner>().is_err());
    }
}
