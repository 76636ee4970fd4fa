//! A1111's names of samplers and schedule types (`/sdapi/v1/samplers`, `/schedulers`,
//! `sampler_name`, `hr_sampler_name`, `scheduler`) and what they are in sdfix.

use serde_json::{json, Value};

use crate::sampling::Sampler;
use crate::schedule::SigmaSchedule;

/// A1111's sampler names and sdfix's, for `/samplers` and `sampler_name`.
pub fn samplers() -> Value {
    Value::Array(
        Sampler::ALL
            .iter()
            .map(|s| json!({"name": s.a1111_name(), "aliases": [s.name()], "options": {}}))
            .collect(),
    )
}

/// A1111's schedule types that sdfix has, by name and label, and what each maps to: `automatic`
/// and `uniform` are the timesteps of `spacing` at their own noise level.
pub(super) const SCHEDULERS: [(&str, &str, SigmaSchedule); 4] = [
    ("automatic", "Automatic", SigmaSchedule::Schedule),
    ("uniform", "Uniform", SigmaSchedule::Schedule),
    ("karras", "Karras", SigmaSchedule::Karras),
    ("exponential", "Exponential", SigmaSchedule::Exponential),
];

/// The body of `/schedulers`.
pub fn schedulers() -> Value {
    Value::Array(
        SCHEDULERS
            .iter()
            .map(|(name, label, sigmas)| {
                json!({
                    "name": name, "label": label, "aliases": null,
                    "default_rho": if *sigmas == SigmaSchedule::Karras { 7.0 } else { -1.0 },
                    "need_inner_model": false,
                })
            })
            .collect(),
    )
}

/// A sampler by A1111 label (`Euler a`), sdfix name (`euler_a`) or A1111 alias (`k_euler_a`),
/// any case; a label with a schedule suffix (`DPM++ 2M Karras`, A1111 before 1.9) also gives
/// the schedule.
pub fn parse_sampler(name: &str) -> Option<(Sampler, Option<SigmaSchedule>)> {
    let lower = name.trim().to_lowercase();
    let find = |n: &str| {
        let n = n.strip_prefix("k_").unwrap_or(n);
        Sampler::ALL
            .into_iter()
            .find(|s| s.a1111_name().to_lowercase() == n || s.name() == n)
    };
    if let Some(sampler) = find(&lower) {
        return Some((sampler, None));
    }
    for (suffix, sigmas) in [
        (" karras", SigmaSchedule::Karras),
        (" exponential", SigmaSchedule::Exponential),
    ] {
        if let Some(sampler) = lower.strip_suffix(suffix).and_then(find) {
            return Some((sampler, Some(sigmas)));
        }
    }
    None
}

/// A schedule type by name or label, any case.
pub(super) fn parse_scheduler(name: &str) -> Option<(&'static str, SigmaSchedule)> {
    let lower = name.trim().to_lowercase();
    SCHEDULERS
        .iter()
        .find(|(n, _, _)| *n == lower)
        .map(|(_, label, sigmas)| (*label, *sigmas))
}

/// The label of a sigma schedule, for responses.
pub(super) fn scheduler_label(sigmas: SigmaSchedule) -> &'static str {
    SCHEDULERS
        .iter()
        .find(|(_, _, s)| *s == sigmas)
        .map_or("Automatic", |(_, label, _)| label)
}
