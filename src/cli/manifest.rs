//! `sdfix manifest check|merge DIR`: after sharded or requeued runs into one folder, what is
//! there against what the prompt file asks for, and a clean manifest.
//!
//! `check DIR --prompts FILE` lists each image the file asks for that is missing (what to
//! requeue), slots holding more than one image (runs with different seeds), orphans (images of
//! `generate`'s naming that the file does not ask for) and manifest lines that are duplicated,
//! unreadable or name no file; it fails when an image is missing or doubled. `merge DIR` rewrites
//! the manifest with one line per image present, in prompt-file order (by line, then image
//! index), keeping the last line written for each. Run it once the workers are done: a worker
//! appending during the rewrite loses its line.
//!
//! An image's slot is its prompt-file line and image index, read from its name
//! (`<line>-<image>-<seed>-<slug>.png`, [`png::image_name`]); the slug must match the line's
//! prompt, and with `--seed` (as given to `generate`) the seed must too.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use super::args::at_least_one;
use super::prompts;
use crate::output::{manifest, png};

#[derive(Debug, Args)]
pub struct ManifestArgs {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, Subcommand)]
pub enum Action {
    /// Missing, doubled and orphan images against a prompt file, and the manifest's state; exits
    /// 2 when an image is missing or doubled.
    Check(CheckArgs),
    /// Rewrite manifest.jsonl with one line per image present, in prompt-file order (run it once
    /// the workers are done); with --prompts, then check.
    Merge(MergeArgs),
}

/// What `generate` was given that decides the file names.
#[derive(Debug, Clone, Args)]
pub struct Expected {
    /// Images per prompt given to generate [default: 1]; a .jsonl line's num_images wins.
    #[arg(long, value_parser = at_least_one)]
    pub num_images: Option<usize>,

    /// --seed given to generate, to check seeds too [default: any seed fills a slot].
    #[arg(long)]
    pub seed: Option<u64>,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The output folder of the runs.
    pub dir: PathBuf,

    /// The prompt file the runs were given (.txt or .jsonl).
    #[arg(long, value_name = "FILE")]
    pub prompts: PathBuf,

    #[command(flatten)]
    pub expected: Expected,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The output folder of the runs.
    pub dir: PathBuf,

    /// Also check the folder against this prompt file afterwards.
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,

    #[command(flatten)]
    pub expected: Expected,
}

pub fn run(args: &ManifestArgs) -> Result<()> {
    match &args.action {
        Action::Check(check_args) => check(&check_args.dir, &check_args.prompts, &check_args.expected),
        Action::Merge(merge_args) => {
            merge(&merge_args.dir)?;
            match &merge_args.prompts {
                Some(prompts) => check(&merge_args.dir, prompts, &merge_args.expected),
                None => Ok(()),
            }
        }
    }
}

/// One image the prompt file asks for.
struct Slot {
    line: usize,
    image: usize,
    /// Known only with `--seed` or a line's own seed.
    seed: Option<u64>,
    slug: String,
    prompt: String,
}

/// The images of `generate`'s naming in `dir` (hidden temporaries and other files left out),
/// sorted by name.
fn images(dir: &Path) -> Result<Vec<(String, png::ImageName)>> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    let mut found: Vec<(String, png::ImageName)> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|name| png::parse_image_name(&name).map(|parsed| (name, parsed)))
        .collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(found)
}

/// A manifest's lines sorted out.
struct Records {
    /// The lines that name a file, by file name, in the order written.
    by_file: BTreeMap<String, Vec<serde_json::Value>>,
    /// 1-based numbers of the lines that are not JSON objects with a `file`.
    unreadable: Vec<usize>,
}

fn records(dir: &Path) -> Result<Records> {
    let mut by_file: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    let mut unreadable = Vec::new();
    for (n, line) in manifest::read(dir)?.into_iter().enumerate() {
        match line.map(|record| (record["file"].as_str().map(str::to_string), record)) {
            Ok((Some(file), record)) => by_file.entry(file).or_default().push(record),
            _ => unreadable.push(n + 1),
        }
    }
    Ok(Records { by_file, unreadable })
}

fn check(dir: &Path, prompt_file: &Path, expected: &Expected) -> Result<()> {
    anyhow::ensure!(
        dir.is_dir(),
        "{} is not a folder; pass the --out-dir of the runs",
        dir.display()
    );
    let (label, entries) = prompts::read_prompt_file(prompt_file)?;
    let mut out = std::io::stdout().lock();
    let mut slots: BTreeMap<(usize, usize), Slot> = BTreeMap::new();
    for entry in &entries {
        match entry {
            Ok(entry) => {
                let count = entry.overrides.num_images.or(expected.num_images).unwrap_or(1);
                let seed = entry.overrides.seed.or(expected.seed);
                for image in 0..count {
                    slots.insert(
                        (entry.line, image),
                        Slot {
                            line: entry.line,
                            image,
                            seed: seed.map(|s| s.wrapping_add(image as u64)),
                            slug: png::slug(&entry.prompt),
                            prompt: entry.prompt.clone(),
                        },
                    );
                }
            }
            Err(bad) => writeln!(
                out,
                "unusable {label}:{}: {} (generate skips it too)",
                bad.line, bad.message
            )?,
        }
    }

    let mut filled: HashMap<(usize, usize), Vec<String>> = HashMap::new();
    let mut orphans = Vec::new();
    for (name, parsed) in images(dir)? {
        let key = (parsed.line, parsed.image);
        let fits = slots
            .get(&key)
            .is_some_and(|slot| slot.slug == parsed.slug && slot.seed.is_none_or(|s| s == parsed.seed));
        if fits {
            filled.entry(key).or_default().push(name);
        } else {
            orphans.push(name);
        }
    }
    let mut missing = 0;
    let mut doubled = 0;
    for (key, slot) in &slots {
        let seed = slot
            .seed
            .map(|s| format!("seed {s}"))
            .unwrap_or_else(|| "any seed".into());
        match filled.get(key).map(Vec::as_slice) {
            None | Some([]) => {
                missing += 1;
                writeln!(
                    out,
                    "missing {label}:{} image {} ({seed}): {}",
                    slot.line, slot.image, slot.prompt
                )?;
            }
            Some([_]) => {}
            Some(names) => {
                doubled += 1;
                writeln!(
                    out,
                    "doubled {label}:{} image {}: {}",
                    slot.line,
                    slot.image,
                    names.join(", ")
                )?;
            }
        }
    }
    for name in &orphans {
        writeln!(out, "orphan {name}: not asked for by {label}")?;
    }

    let Records {
        by_file: records,
        unreadable,
    } = records(dir)?;
    let present: Vec<&String> = filled.values().flatten().chain(&orphans).collect();
    let unrecorded = present.iter().filter(|n| !records.contains_key(n.as_str())).count();
    let repeated = records.values().filter(|r| r.len() > 1).count();
    let stale = records.keys().filter(|file| !dir.join(file).exists()).count();
    for n in &unreadable {
        writeln!(out, "unreadable {}:{n}", dir.join(manifest::MANIFEST).display())?;
    }
    writeln!(
        out,
        "{}: {} image(s) asked for, {} present, {missing} missing, {doubled} doubled, {} orphan(s); \
         manifest: {repeated} image(s) with several lines, {unrecorded} with none, {stale} line(s) for \
         no file, {} unreadable",
        dir.display(),
        slots.len(),
        slots.len() - missing,
        orphans.len(),
        unreadable.len(),
    )?;
    if repeated + stale + unreadable.len() > 0 {
        writeln!(
            out,
            "run `sdfix manifest merge {}` for one line per image",
            dir.display()
        )?;
    }
    if missing + doubled > 0 {
        bail!(
            "{missing} image(s) missing, {doubled} doubled in {}: rerun generate with the same flags \
             and --skip-existing for the missing ones; remove all but one of each doubled one",
            dir.display()
        );
    }
    Ok(())
}

/// Rewrites `dir`'s manifest: for each image of `generate`'s naming that is present, its last
/// line, in (prompt line, image index, name) order. Images without a line are named, not
/// invented: their time and initial-noise mean are not in the PNG.
fn merge(dir: &Path) -> Result<()> {
    anyhow::ensure!(
        dir.is_dir(),
        "{} is not a folder; pass the --out-dir of the runs",
        dir.display()
    );
    let Records {
        by_file: mut records,
        unreadable,
    } = records(dir)?;
    let total_lines: usize = records.values().map(Vec::len).sum::<usize>() + unreadable.len();
    let mut merged = Vec::new();
    let mut unrecorded = Vec::new();
    let mut found = images(dir)?;
    found.sort_by(|(a_name, a), (b_name, b)| (a.line, a.image, a_name).cmp(&(b.line, b.image, b_name)));
    for (name, _) in found {
        match records.remove(&name).and_then(|mut lines| lines.pop()) {
            Some(record) => merged.push(record),
            None => unrecorded.push(name),
        }
    }
    manifest::replace(dir, &merged)?;
    let mut err = std::io::stderr().lock();
    for name in &unrecorded {
        writeln!(
            err,
            "note: {name} has no manifest line (rerun it with --overwrite to record it)"
        )?;
    }
    writeln!(
        err,
        "wrote {} line(s) to {} (was {total_lines}: {} unreadable, {} for no file, the rest repeats)",
        merged.len(),
        dir.join(manifest::MANIFEST).display(),
        unreadable.len(),
        records.len(),
    )?;
    Ok(())
}
