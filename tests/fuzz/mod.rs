//! A seeded mutation fuzzer for the readers of downloaded files (stable Rust has no libFuzzer):
//! each case mutates one seed of a committed corpus, writes it to a file, runs a reader on it, and
//! checks what came back (the oracle, [`check_case`]):
//! - no panic (caught, its message and place kept);
//! - no single allocation over [`ALLOCATION_LIMIT_BYTES`] on the reading thread (this test
//!   binary's allocator notes the largest request): the inputs are kilobytes, so a bigger one was
//!   sized by a field of the file, not by its contents;
//! - every error one line (`{:#}`, the whole chain) that names the file;
//! - no case slower than [`SLOW_CASE`].
//!
//! A case that breaks a rule is a finding: its input is saved under `target/fuzz-findings/`, to
//! become a regression case in tests/fixtures/fuzz/READER/regressions/. A crash the test cannot
//! catch (a stack overflow, an allocation the OS refuses) aborts the process instead: the input
//! is then the file the run printed it writes each case to.

pub mod bytes;
pub mod pickle;
pub mod safetensors;

use std::alloc::{GlobalAlloc, Layout, System};
use std::backtrace::{Backtrace, BacktraceStatus};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Once, OnceLock};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub type Rand = ChaCha8Rng;

/// The largest single allocation a case may make: a hundred times the largest input, and still
/// far below what a header field can ask for.
pub const ALLOCATION_LIMIT_BYTES: usize = 64 << 20;
/// A case slower than this is a finding (the readers take milliseconds on these inputs).
const SLOW_CASE: Duration = Duration::from_secs(10);
/// How often a long run prints its counts.
const REPORT_EVERY: Duration = Duration::from_secs(60);

thread_local! {
    /// The largest allocation this thread asked for since the last reset.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    /// Set while a case runs: its panic is recorded here instead of printed.
    static PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
    static IN_CASE: Cell<bool> = const { Cell::new(false) };
}

/// The system allocator, noting each thread's largest request.
pub struct Watching;

fn note(bytes: usize) {
    // `try_with`: a thread being torn down has no slot left, and needs none.
    let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(bytes)));
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds `GlobalAlloc`'s contract;
// `note` only updates a const-initialised thread-local `Cell`, which allocates nothing.
unsafe impl GlobalAlloc for Watching {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's layout, passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's layout, passed on as is.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: the caller's block, layout and size, passed on as they are.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's block and layout, passed on as they are.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// One committed input.
pub struct Seed {
    pub name: String,
    pub extension: String,
    pub bytes: Vec<u8>,
}

/// The files of `dir` (and of its `regressions/`), sorted by name.
pub fn corpus(dir: &Path) -> Vec<Seed> {
    let mut paths: Vec<PathBuf> = [dir.to_path_buf(), dir.join("regressions")]
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file())
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| Seed {
            name: path.file_name().unwrap().to_string_lossy().into_owned(),
            extension: path
                .extension()
                .map_or(String::new(), |e| e.to_string_lossy().into_owned()),
            bytes: std::fs::read(&path).unwrap(),
        })
        .collect()
}

/// A reader under test: how to mutate its inputs and how to read one.
pub struct Target {
    pub name: &'static str,
    pub seeds: Vec<Seed>,
    /// A new input from seed `index` (the others are there to splice from).
    pub mutate: fn(&mut Rand, usize, &[Seed]) -> Vec<u8>,
    /// Reads the file, pushing every error a call returned (reading goes on where it can).
    pub read: fn(&Path, &mut Vec<anyhow::Error>),
}

/// What one case broke.
#[derive(Debug)]
pub struct Finding {
    pub rule: &'static str,
    pub detail: String,
    pub saved: PathBuf,
}

/// Counts of a run.
#[derive(Default)]
pub struct Report {
    pub cases: u64,
    pub read_whole: u64,
    pub errors: u64,
    /// Distinct errors with the file name and numbers blanked: a rough view of the paths reached.
    pub error_kinds: BTreeMap<String, u64>,
    pub findings: Vec<Finding>,
    pub largest_allocation: usize,
    pub slowest: Duration,
    pub elapsed: Duration,
}

impl Report {
    /// One line per finding.
    pub fn findings_text(&self) -> String {
        let lines: Vec<String> = self
            .findings
            .iter()
            .map(|f| format!("{}: {} (input: {})", f.rule, f.detail, f.saved.display()))
            .collect();
        lines.join("\n")
    }

    pub fn summary(&self, target: &str, seed: u64) -> String {
        format!(
            "fuzz {target} (seed {seed}): {} cases in {:.0} s, {} read whole, {} errors of {} kinds, \
             largest allocation {} KiB, slowest case {} ms, {} findings",
            self.cases,
            self.elapsed.as_secs_f64(),
            self.read_whole,
            self.errors,
            self.error_kinds.len(),
            self.largest_allocation >> 10,
            self.slowest.as_millis(),
            self.findings.len()
        )
    }
}

/// How long a run goes on.
pub enum Budget {
    Cases(u64),
    Time(Duration),
}

fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if IN_CASE.with(Cell::get) {
                let place = info.location().map_or(String::new(), |l| format!(" at {l}"));
                PANIC.with(|p| *p.borrow_mut() = Some(format!("{}{place}", info.payload_as_str().unwrap_or("?"))));
            } else {
                previous(info);
            }
        }));
    });
}

/// The first rule the case at `path` broke, if any; its counts go into `report`.
fn check_case(target: &Target, path: &Path, report: &mut Report) -> Option<(&'static str, String)> {
    let label = path.display().to_string();
    LARGEST.with(|l| l.set(0));
    IN_CASE.with(|c| c.set(true));
    let started = Instant::now();
    let mut errors = Vec::new();
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| (target.read)(path, &mut errors)));
    let took = started.elapsed();
    IN_CASE.with(|c| c.set(false));
    let largest = LARGEST.with(Cell::get);
    report.largest_allocation = report.largest_allocation.max(largest);
    report.slowest = report.slowest.max(took);
    if outcome.is_err() {
        let message = PANIC.with(|p| p.borrow_mut().take()).unwrap_or_default();
        return Some(("panic", message));
    }
    if largest > ALLOCATION_LIMIT_BYTES {
        return Some(("allocation", format!("{largest} bytes in one allocation")));
    }
    if took > SLOW_CASE {
        return Some(("slow", format!("{} ms", took.as_millis())));
    }
    if errors.is_empty() {
        report.read_whole += 1;
    }
    for error in errors {
        report.errors += 1;
        let message = without_backtrace(&format!("{error:#}"));
        if message.contains('\n') || !message.contains(&label) {
            return Some(("error message", message));
        }
        *report.error_kinds.entry(kind_of(&message, &label)).or_default() += 1;
    }
    None
}

/// The message without the backtrace candle appends to its errors when `RUST_BACKTRACE` (or
/// `RUST_LIB_BACKTRACE`) asks for them: one line is the rule for what the user did not ask for.
fn without_backtrace(message: &str) -> String {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    let enabled = *ENABLED.get_or_init(|| Backtrace::capture().status() == BacktraceStatus::Captured);
    match message.find("\n   0: ") {
        Some(end) if enabled => message[..end].to_string(),
        _ => message.to_string(),
    }
}

/// An error's shape: the file name and every number blanked, its first and last words (the
/// outermost context and the root cause).
fn kind_of(message: &str, label: &str) -> String {
    let text = message.replace(label, "FILE");
    let mut kind = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            if !kind.ends_with('#') {
                kind.push('#');
            }
        } else {
            kind.push(c);
        }
    }
    let chars: Vec<char> = kind.chars().collect();
    if chars.len() <= 100 {
        return kind;
    }
    let head: String = chars[..30].iter().collect();
    let tail: String = chars[chars.len() - 70..].iter().collect();
    format!("{head} .. {tail}")
}

/// FNV-1a, to name saved inputs by their bytes.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Runs `target` from `seed` until the budget is spent; every case's input is written to one file
/// in a folder of its own (printed, so that an aborted run leaves the input that aborted it).
pub fn run(target: &Target, seed: u64, budget: Budget) -> Report {
    install_panic_hook();
    let dir = std::env::temp_dir().join(format!("sdfix-fuzz-{}-{}", target.name, std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let findings_dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/fuzz-findings")
        .join(target.name);
    eprintln!(
        "fuzz {}: seed {seed}, each input written to {}",
        target.name,
        dir.display()
    );
    let mut rng = Rand::seed_from_u64(seed);
    let mut report = Report::default();
    let started = Instant::now();
    let mut reported = Instant::now();
    loop {
        match budget {
            Budget::Cases(n) if report.cases >= n => break,
            Budget::Time(limit) if started.elapsed() >= limit => break,
            _ => {}
        }
        let index = rng.random_range(0..target.seeds.len());
        let input = (target.mutate)(&mut rng, index, &target.seeds);
        let path = dir.join(format!("case.{}", target.seeds[index].extension));
        std::fs::write(&path, &input).unwrap();
        report.cases += 1;
        if let Some((rule, detail)) = check_case(target, &path, &mut report) {
            std::fs::create_dir_all(&findings_dir).unwrap();
            let saved = findings_dir.join(format!(
                "{}-{:016x}.{}",
                rule.replace(' ', "-"),
                fnv(&input),
                target.seeds[index].extension
            ));
            std::fs::write(&saved, &input).unwrap();
            eprintln!(
                "fuzz {}: {rule}: {detail} (input saved as {})",
                target.name,
                saved.display()
            );
            report.findings.push(Finding { rule, detail, saved });
        }
        if reported.elapsed() >= REPORT_EVERY {
            reported = Instant::now();
            report.elapsed = started.elapsed();
            eprintln!("{}", report.summary(target.name, seed));
        }
    }
    report.elapsed = started.elapsed();
    let _ = std::fs::remove_dir_all(&dir);
    report
}

/// Runs every seed unmutated (the corpus and its regressions): each must pass the oracle.
pub fn replay(target: &Target) -> Vec<String> {
    install_panic_hook();
    let dir = tempfile::tempdir().unwrap();
    let mut report = Report::default();
    let mut broken = Vec::new();
    for seed in &target.seeds {
        let path = dir.path().join(&seed.name);
        std::fs::write(&path, &seed.bytes).unwrap();
        if let Some((rule, detail)) = check_case(target, &path, &mut report) {
            broken.push(format!("{}: {rule}: {detail}", seed.name));
        }
    }
    broken
}

/// A random element of a non-empty slice.
pub fn pick<'a, T>(rng: &mut Rand, items: &'a [T]) -> &'a T {
    &items[rng.random_range(0..items.len())]
}
