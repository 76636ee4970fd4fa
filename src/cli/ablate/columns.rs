//! What `ablate`'s axes vary: the `--sweep KEY=V1,V2,...` axes, the paper's fix columns, and the
//! rule that keeps a fix out of the cells of a model that cannot take it.
//!
//! The rule (one for the CLI and the server's "Compare fixes" page): zero terminal SNR can be
//! sampled only with a model that does not predict epsilon ([`crate::engine::request::zero_snr_applies`]).
//! For such a model the fix columns skip zero SNR and keep the rest: `+trailing` and `+rescaled
//! CFG` are trailing and rescaled CFG on the model's own betas. A column whose only point is zero
//! SNR (`+zero-SNR`, or a combination of `--all-combinations` with it) has nothing to show for
//! that model: its cell repeats the column it then equals (`+zero-SNR` is `baseline` for an epsilon model),
//! captioned so, and when no model of the grid can take it the column goes.

use std::str::FromStr;

use anyhow::{bail, Context, Result};

use crate::engine::Request;
use crate::schedule::TimestepSpacing;

/// A setting an axis varies, with its values as typed.
#[derive(Debug, Clone, PartialEq)]
pub struct Sweep {
    pub key: SweepKey,
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SweepKey {
    Guidance,
    GuidanceRescale,
    Steps,
    Spacing,
    Eta,
    Sampler,
    /// The model: not a request setting; its values are `--model` values, each a group of rows.
    Model,
}

impl SweepKey {
    pub fn name(self) -> &'static str {
        match self {
            Self::Guidance => "guidance",
            Self::GuidanceRescale => "guidance-rescale",
            Self::Steps => "steps",
            Self::Spacing => "spacing",
            Self::Eta => "eta",
            Self::Sampler => "sampler",
            Self::Model => "model",
        }
    }

    /// Applies `value` to `request`; an unparsable value is an error naming the key.
    fn apply(self, request: &mut Request, value: &str) -> Result<()> {
        let bad = || format!("--sweep {}: {value:?} is not a valid value", self.name());
        match self {
            Self::Guidance => request.guidance = value.parse().with_context(bad)?,
            Self::GuidanceRescale => request.guidance_rescale = value.parse().with_context(bad)?,
            Self::Steps => request.steps = value.parse().with_context(bad)?,
            Self::Spacing => request.spacing = value.parse().map_err(anyhow::Error::msg).with_context(bad)?,
            Self::Eta => request.eta = value.parse().with_context(bad)?,
            Self::Sampler => request.sampler = value.parse().map_err(anyhow::Error::msg).with_context(bad)?,
            Self::Model => bail!("internal: --sweep model is not a request setting"),
        }
        Ok(())
    }
}

impl FromStr for Sweep {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (key, values) = s.split_once('=').ok_or_else(|| format!("{s:?} is not KEY=V1,V2,..."))?;
        let key = match key {
            "guidance" => SweepKey::Guidance,
            "guidance-rescale" | "guidance_rescale" => SweepKey::GuidanceRescale,
            "steps" => SweepKey::Steps,
            "spacing" => SweepKey::Spacing,
            "eta" => SweepKey::Eta,
            "sampler" => SweepKey::Sampler,
            "model" => SweepKey::Model,
            other => {
                return Err(format!(
                    "unknown sweep key {other:?}; expected guidance, guidance-rescale, steps, spacing, eta, sampler \
                     or model"
                ))
            }
        };
        let values: Vec<String> = values
            .split(',')
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect();
        if values.is_empty() {
            return Err(format!("{s:?} lists no values"));
        }
        Ok(Self { key, values })
    }
}

/// How a column (or a row group) changes the request.
#[derive(Debug, Clone)]
pub struct Variant {
    pub label: String,
    zero_snr: Option<bool>,
    spacing: Option<TimestepSpacing>,
    guidance_rescale: Option<f64>,
    sweep: Option<(SweepKey, String)>,
    /// What the column shows is zero SNR's effect (`+zero-SNR`, or a combination with zero SNR):
    /// without zero SNR the cell would repeat another column.
    about_zero_snr: bool,
}

impl Variant {
    fn fixes(label: &str, zero_snr: bool, trailing: bool, rescale: Option<f64>) -> Self {
        Self {
            label: label.to_string(),
            zero_snr: Some(zero_snr),
            spacing: Some(if trailing {
                TimestepSpacing::Trailing
            } else {
                TimestepSpacing::Leading
            }),
            guidance_rescale: Some(rescale.unwrap_or(0.0)),
            sweep: None,
            about_zero_snr: false,
        }
    }

    /// Whether a model that can (`zero_snr_applies`) or cannot take zero SNR has a cell here.
    pub fn applies_to(&self, zero_snr_applies: bool) -> bool {
        zero_snr_applies || !self.about_zero_snr
    }

    /// Whether the column turns zero SNR on (and so skips it for a model that cannot take it).
    pub fn adds_zero_snr(&self) -> bool {
        self.zero_snr == Some(true)
    }

    /// Whether `other` is this column with zero SNR left out: what this column's cell is for a
    /// model that cannot take zero SNR (`+zero-SNR` -> `baseline`, `zero-SNR+trailing` ->
    /// `trailing`).
    pub fn reduces_to(&self, other: &Variant) -> bool {
        self.adds_zero_snr()
            && !other.adds_zero_snr()
            && self.spacing == other.spacing
            && self.guidance_rescale == other.guidance_rescale
            && self.sweep == other.sweep
    }

    /// Applies the column to `request`, for a model that can or cannot take zero SNR: one that
    /// cannot keeps its own betas (the fix skipped, the others applied).
    pub fn apply(&self, request: &mut Request, zero_snr_applies: bool) -> Result<()> {
        if let Some(z) = self.zero_snr {
            request.zero_snr = Some(z && zero_snr_applies);
        }
        if let Some(s) = self.spacing {
            request.spacing = s;
        }
        if let Some(r) = self.guidance_rescale {
            request.guidance_rescale = r;
        }
        if let Some((key, value)) = &self.sweep {
            key.apply(request, value)?;
        }
        Ok(())
    }
}

/// One variant per value of `sweep` (not the model axis).
pub fn sweep_variants(sweep: &Sweep) -> Vec<Variant> {
    sweep
        .values
        .iter()
        .map(|v| Variant {
            label: format!("{}={v}", sweep.key.name()),
            zero_snr: None,
            spacing: None,
            guidance_rescale: None,
            sweep: Some((sweep.key, v.clone())),
            about_zero_snr: false,
        })
        .collect()
}

/// The paper's fix columns (Lin et al. 2024, Figure 6 / Table 3): the cumulative progression, or
/// all 8 on/off combinations of the three sampler-side fixes; `phi` is the rescaled CFG's.
pub fn fix_columns(all_combinations: bool, phi: f64) -> Vec<Variant> {
    if all_combinations {
        let mut all = Vec::new();
        for zero_snr in [false, true] {
            for trailing in [false, true] {
                for rescale in [false, true] {
                    let names: Vec<&str> = [(zero_snr, "zero-SNR"), (trailing, "trailing"), (rescale, "rescale")]
                        .iter()
                        .filter_map(|(on, name)| on.then_some(*name))
                        .collect();
                    let label = if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join("+")
                    };
                    all.push(Variant {
                        about_zero_snr: zero_snr,
                        ..Variant::fixes(&label, zero_snr, trailing, rescale.then_some(phi))
                    });
                }
            }
        }
        return all;
    }
    vec![
        Variant::fixes("baseline", false, false, None),
        Variant {
            about_zero_snr: true,
            ..Variant::fixes("+zero-SNR", true, false, None)
        },
        Variant::fixes("+trailing", true, true, None),
        Variant::fixes("+rescaled CFG", true, true, Some(phi)),
    ]
}

/// The columns some model of the grid has a cell in (`zero_snr_applies`: per model).
pub fn applicable(columns: Vec<Variant>, zero_snr_applies: &[bool]) -> Vec<Variant> {
    columns
        .into_iter()
        .filter(|c| zero_snr_applies.iter().any(|&z| c.applies_to(z)))
        .collect()
}

/// The grid's footnote naming the models zero SNR was skipped for, once: `columns` as built,
/// `kept` those [`applicable`], `skipped` the models that cannot take zero SNR (`None` when no
/// column turns it on, or every model can).
pub fn skipped_note(columns: &[Variant], kept: &[Variant], skipped: &[&str]) -> Option<String> {
    if skipped.is_empty() || !columns.iter().any(Variant::adds_zero_snr) {
        return None;
    }
    let (names, verb) = match skipped {
        [one] => (one.to_string(), "predicts"),
        many => (many.join(", "), "predict"),
    };
    let only_zero_snr = if kept.len() < columns.len() {
        "; the columns that only add zero SNR are left out"
    } else if kept.iter().any(|c| !c.applies_to(false)) {
        "; where a column only adds zero SNR, its cell is the column it then equals (\"= baseline\")"
    } else {
        ""
    };
    Some(format!(
        "zero-SNR skipped for {names}: {verb} epsilon, and zero terminal SNR needs v_prediction (or sample); \
         the other fixes are applied{only_zero_snr}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(columns: &[Variant]) -> Vec<&str> {
        columns.iter().map(|c| c.label.as_str()).collect()
    }

    #[test]
    fn an_epsilon_model_keeps_the_columns_that_apply() {
        let kept = applicable(fix_columns(false, 0.7), &[false]);
        assert_eq!(labels(&kept), ["baseline", "+trailing", "+rescaled CFG"]);
        let mut request = Request::new("x");
        kept[2].apply(&mut request, false).unwrap();
        assert_eq!(request.zero_snr, Some(false));
        assert_eq!(request.spacing, TimestepSpacing::Trailing);
        assert_eq!(request.guidance_rescale, 0.7);
        let note = skipped_note(&fix_columns(false, 0.7), &kept, &["demo-flawed"]).unwrap();
        assert!(
            note.starts_with("zero-SNR skipped for demo-flawed: predicts epsilon"),
            "{note}"
        );
        assert!(note.ends_with("left out"), "{note}");
    }

    #[test]
    fn mixed_models_keep_every_column_and_repeat_what_one_cannot_take() {
        let kept = applicable(fix_columns(false, 0.7), &[false, true]);
        assert_eq!(kept.len(), 4);
        assert!(!kept[1].applies_to(false) && kept[1].applies_to(true));
        let all = fix_columns(false, 0.7);
        assert!(skipped_note(&all, &kept, &["demo-flawed"])
            .unwrap()
            .contains("= baseline"));
        // Each column an epsilon model cannot take equals exactly one other column for it.
        for columns in [all.clone(), fix_columns(true, 0.7)] {
            for column in columns.iter().filter(|c| !c.applies_to(false)) {
                let equal: Vec<&str> = columns
                    .iter()
                    .filter(|o| column.reduces_to(o))
                    .map(|o| o.label.as_str())
                    .collect();
                assert_eq!(equal.len(), 1, "{}: {equal:?}", column.label);
            }
        }
        assert_eq!(skipped_note(&all, &kept, &[]), None);
    }

    #[test]
    fn all_combinations_without_zero_snr_are_the_four_without_it() {
        let kept = applicable(fix_columns(true, 0.7), &[false]);
        assert_eq!(labels(&kept), ["none", "rescale", "trailing", "trailing+rescale"]);
        assert_eq!(applicable(fix_columns(true, 0.7), &[true]).len(), 8);
    }
}
