//! `--shard I/N` and `--shard auto`: which part of a prompt file this worker takes.
//!
//! Worker I of N takes the prompt entries whose index mod N is I, so N workers cover the file
//! exactly once. `auto` reads I and N from the scheduler that started the worker, so one job
//! script serves any array size:
//!
//! - Slurm job arrays (`sbatch --array=A-B[:S]`): I = (`SLURM_ARRAY_TASK_ID` -
//!   `SLURM_ARRAY_TASK_MIN`) / `SLURM_ARRAY_TASK_STEP`, N = `SLURM_ARRAY_TASK_COUNT`. An array
//!   given as a list (`--array=1,5,9`) has no such numbering and is refused.
//! - Kubernetes Indexed Jobs: I = `JOB_COMPLETION_INDEX`; the pod is not told the Job's
//!   `completions`, so N comes from `--shard-count`.

use std::str::FromStr;

use anyhow::{bail, ensure, Context, Result};

/// Worker `index` of `count`: takes the prompt entries whose index mod `count` is `index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// The whole file: what a run without `--shard` takes.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// Whether the prompt entry at `index` (from 0, in file order) is this worker's.
    pub fn takes(&self, index: usize) -> bool {
        index % self.count == self.index
    }
}

impl FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parsed = s
            .split_once('/')
            .and_then(|(i, n)| Some((i.parse().ok()?, n.parse().ok()?)));
        match parsed {
            Some((index, count)) if index < count => Ok(Self { index, count }),
            _ => Err(format!(
                "{s:?} is not I/N with 0 <= I < N (e.g. 0/4), nor auto (from Slurm's or Kubernetes' environment)"
            )),
        }
    }
}

/// What `--shard` said: a fixed I/N, or `auto` (resolved from the environment at run time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardArg {
    Fixed(Shard),
    Auto,
}

impl FromStr for ShardArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "auto" {
            Ok(Self::Auto)
        } else {
            s.parse().map(Self::Fixed)
        }
    }
}

impl ShardArg {
    /// This worker's shard: the fixed one, or `auto` read from the process environment, with
    /// `--shard-count` as `shard_count`.
    pub fn resolve(self, shard_count: Option<usize>) -> Result<Shard> {
        self.resolve_with(shard_count, |name| std::env::var(name).ok())
    }

    /// [`Self::resolve`] with the environment given as a lookup, so tests need not set variables.
    pub fn resolve_with(self, shard_count: Option<usize>, env: impl Fn(&str) -> Option<String>) -> Result<Shard> {
        match self {
            Self::Fixed(shard) => {
                ensure!(
                    shard_count.is_none(),
                    "--shard-count goes with --shard auto; with --shard I/N the count is N"
                );
                Ok(shard)
            }
            Self::Auto => from_environment(shard_count, env),
        }
    }
}

/// Reads a whole-number environment variable, naming it when it is not one.
fn number(env: &impl Fn(&str) -> Option<String>, name: &str) -> Result<Option<usize>> {
    env(name)
        .map(|value| {
            value
                .trim()
                .parse::<usize>()
                .ok()
                .with_context(|| format!("--shard auto: {name}={value:?} is not a whole number"))
        })
        .transpose()
}

/// `--shard auto`: Slurm's array variables first, then Kubernetes' completion index.
fn from_environment(shard_count: Option<usize>, env: impl Fn(&str) -> Option<String>) -> Result<Shard> {
    if let Some(id) = number(&env, "SLURM_ARRAY_TASK_ID")? {
        let count = number(&env, "SLURM_ARRAY_TASK_COUNT")?
            .context("--shard auto: SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not")?;
        let min = number(&env, "SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
        let step = number(&env, "SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
        let offset = id.checked_sub(min).filter(|o| o % step == 0);
        let index = offset.map(|o| o / step).filter(|&i| i < count);
        let Some(index) = index else {
            bail!(
                "--shard auto: array task {id} is not one of {count} tasks from {min} in steps of {step}; \
                 submit a range (sbatch --array=0-{}) or pass --shard I/N",
                count.saturating_sub(1)
            );
        };
        if let Some(n) = shard_count {
            ensure!(
                n == count,
                "--shard-count {n} disagrees with SLURM_ARRAY_TASK_COUNT={count}; drop --shard-count"
            );
        }
        return Ok(Shard { index, count });
    }
    if let Some(index) = number(&env, "JOB_COMPLETION_INDEX")? {
        let count = shard_count.context(
            "--shard auto: JOB_COMPLETION_INDEX is set but not the count; pass --shard-count N (the Job's completions)",
        )?;
        ensure!(
            index < count,
            "--shard auto: JOB_COMPLETION_INDEX={index} is not below --shard-count {count}; \
             pass the Job's completions as --shard-count"
        );
        return Ok(Shard { index, count });
    }
    bail!(
        "--shard auto: neither SLURM_ARRAY_TASK_ID (sbatch --array) nor JOB_COMPLETION_INDEX \
         (Kubernetes Indexed Job) is set; run under one of them or pass --shard I/N"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auto(vars: &[(&str, &str)], count: Option<usize>) -> Result<Shard> {
        ShardArg::Auto.resolve_with(count, |name| {
            vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn slurm_arrays_number_from_their_first_task_in_steps() {
        let array = |id, min, step, count| {
            auto(
                &[
                    ("SLURM_ARRAY_TASK_ID", id),
                    ("SLURM_ARRAY_TASK_MIN", min),
                    ("SLURM_ARRAY_TASK_STEP", step),
                    ("SLURM_ARRAY_TASK_COUNT", count),
                ],
                None,
            )
        };
        assert_eq!(array("3", "0", "1", "4").unwrap(), Shard { index: 3, count: 4 });
        assert_eq!(array("5", "5", "1", "4").unwrap(), Shard { index: 0, count: 4 });
        assert_eq!(array("14", "10", "2", "3").unwrap(), Shard { index: 2, count: 3 });
        // A list such as --array=1,4 numbers nothing evenly.
        assert!(array("4", "1", "1", "2").is_err());
        assert!(array("4", "1", "2", "4").is_err());
        assert!(array("9", "1", "2", "4").is_err());
    }

    #[test]
    fn kubernetes_needs_the_count() {
        assert_eq!(
            auto(&[("JOB_COMPLETION_INDEX", "2")], Some(8)).unwrap(),
            Shard { index: 2, count: 8 }
        );
        let err = auto(&[("JOB_COMPLETION_INDEX", "2")], None).unwrap_err();
        assert!(format!("{err}").contains("--shard-count"));
        assert!(auto(&[("JOB_COMPLETION_INDEX", "8")], Some(8)).is_err());
    }

    #[test]
    fn neither_names_both_and_the_fix() {
        let err = format!("{}", auto(&[], None).unwrap_err());
        assert!(
            err.contains("SLURM_ARRAY_TASK_ID") && err.contains("JOB_COMPLETION_INDEX") && err.contains("--shard I/N")
        );
        assert!(auto(&[("SLURM_ARRAY_TASK_ID", "x")], None).is_err());
    }

    #[test]
    fn fixed_shards_parse_and_refuse_a_count() {
        assert_eq!(
            "1/4".parse::<ShardArg>().unwrap(),
            ShardArg::Fixed(Shard { index: 1, count: 4 })
        );
        assert!("4/4".parse::<ShardArg>().is_err());
        assert!(ShardArg::Fixed(Shard::ALL).resolve_with(Some(2), |_| None).is_err());
        assert!(Shard { index: 1, count: 3 }.takes(4));
    }
}
