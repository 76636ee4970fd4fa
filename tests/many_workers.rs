//! Many workers, one folder, black-box on the tiny fixture model: `--shard auto` from Slurm's and
//! Kubernetes' variables, four concurrent shards writing one folder, leftover temporaries of
//! killed workers, and `sdfix manifest check|merge`.

mod common;

use common::fixture;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// The variables `--shard auto` reads; every test starts without them, whatever runs the tests.
const SHARD_VARS: [&str; 5] = [
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_STEP",
    "JOB_COMPLETION_INDEX",
];

/// `sdfix generate` on the tiny model, 1 step, seed 3, with `env` set and `extra` flags.
fn generate_command(out_dir: &Path, env: &[(&str, &str)], extra: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sdfix"));
    command
        .arg("generate")
        .arg("--model")
        .arg(fixture("tiny-sd"))
        .args([
            "--steps", "1", "--seed", "3", "--width", "8", "--height", "8", "--quiet",
        ])
        .arg("--out-dir")
        .arg(out_dir)
        .args(extra);
    for var in SHARD_VARS {
        command.env_remove(var);
    }
    command.envs(env.iter().copied());
    command
}

fn generate(out_dir: &Path, env: &[(&str, &str)], extra: &[&str]) -> Output {
    generate_command(out_dir, env, extra).output().expect("sdfix runs")
}

fn sdfix(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdfix"))
        .args(args)
        .output()
        .expect("sdfix runs")
}

fn pngs(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".png"))
        .collect()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn prompt_file(dir: &Path, count: usize) -> std::path::PathBuf {
    let path = dir.join("prompts.txt");
    let text: String = (0..count).map(|i| format!("prompt number {i}\n")).collect();
    std::fs::write(&path, format!("# {count} prompts\n{text}")).unwrap();
    path
}

#[test]
fn shard_auto_reads_slurm_and_kubernetes() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = prompt_file(dir.path(), 6);
    let prompts = prompts.to_str().unwrap();
    let fixed = dir.path().join("fixed");
    assert!(generate(&fixed, &[], &["--prompts", prompts, "--shard", "1/3"])
        .status
        .success());

    // An array that starts at 5: task 6 is the second of three.
    let slurm = dir.path().join("slurm");
    let vars = [
        ("SLURM_ARRAY_TASK_ID", "6"),
        ("SLURM_ARRAY_TASK_MIN", "5"),
        ("SLURM_ARRAY_TASK_COUNT", "3"),
    ];
    let run = generate(&slurm, &vars, &["--prompts", prompts, "--shard", "auto"]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(pngs(&slurm), pngs(&fixed));
    assert_eq!(pngs(&fixed).len(), 2);

    let k8s = dir.path().join("k8s");
    let vars = [("JOB_COMPLETION_INDEX", "1")];
    let run = generate(
        &k8s,
        &vars,
        &["--prompts", prompts, "--shard", "auto", "--shard-count", "3"],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(pngs(&k8s), pngs(&fixed));

    // Neither: one line naming both and the way out, exit 2, nothing written.
    let none = dir.path().join("none");
    let run = generate(&none, &[], &["--prompts", prompts, "--shard", "auto"]);
    assert_eq!(run.status.code(), Some(2));
    let message = stderr(&run);
    assert_eq!(message.trim().lines().count(), 1, "{message}");
    assert!(message.contains("SLURM_ARRAY_TASK_ID") && message.contains("JOB_COMPLETION_INDEX"));
    assert!(message.contains("--shard I/N"), "{message}");
    assert!(!none.exists());

    let run = generate(
        &none,
        &[("JOB_COMPLETION_INDEX", "1")],
        &["--prompts", prompts, "--shard", "auto"],
    );
    assert_eq!(run.status.code(), Some(2));
    assert!(stderr(&run).contains("--shard-count"), "{}", stderr(&run));
}

/// The concurrency test the issue asks for: four workers append to one manifest at once.
#[test]
fn four_concurrent_shards_write_one_folder_like_one_run() {
    const PROMPTS: usize = 240;
    const WORKERS: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let prompts = prompt_file(dir.path(), PROMPTS);
    let prompts = prompts.to_str().unwrap();
    let shared = dir.path().join("shared");
    let whole = dir.path().join("whole");
    let batch = ["--batch-size", "16"];

    let workers: Vec<_> = (0..WORKERS)
        .map(|i| {
            let shard = format!("{i}/{WORKERS}");
            generate_command(&shared, &[], &["--prompts", prompts, "--shard", &shard])
                .args(batch)
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let unsharded = generate(&whole, &[], &[&["--prompts", prompts][..], &batch[..]].concat());
    assert!(unsharded.status.success(), "{}", stderr(&unsharded));
    for worker in workers {
        let done = worker.wait_with_output().unwrap();
        assert!(done.status.success(), "{}", stderr(&done));
    }

    let names = pngs(&whole);
    assert_eq!(names.len(), PROMPTS);
    assert_eq!(pngs(&shared), names);
    for name in &names {
        assert!(
            std::fs::read(whole.join(name)).unwrap() == std::fs::read(shared.join(name)).unwrap(),
            "{name} differs"
        );
    }
    // Every line whole and parseable, each image exactly once.
    let text = std::fs::read_to_string(shared.join("manifest.jsonl")).unwrap();
    assert!(text.ends_with('\n'));
    let mut recorded = BTreeSet::new();
    for line in text.lines() {
        let record: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|_| panic!("torn line {line:?}"));
        let file = record["file"].as_str().unwrap().to_string();
        assert!(recorded.insert(file.clone()), "{file} recorded twice");
    }
    assert_eq!(recorded, names);

    let check = sdfix(&[
        "manifest",
        "check",
        shared.to_str().unwrap(),
        "--prompts",
        prompts,
        "--seed",
        "3",
    ]);
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{report}{}", stderr(&check));
    assert!(
        report.contains("240 image(s) asked for, 240 present, 0 missing, 0 doubled, 0 orphan(s)"),
        "{report}"
    );
}

#[test]
fn leftover_temporaries_of_dead_writers_are_removed_and_listed() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    // A PID that ran here and has ended.
    let mut ended = Command::new("true").spawn().unwrap();
    let dead = ended.id();
    ended.wait().unwrap();
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    let make = |name: String, modified: std::time::SystemTime| {
        let path = out.join(name);
        std::fs::write(&path, b"partial").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(modified)
            .unwrap();
        path
    };
    let stale = make(format!(".00001-00-1-a.png.{dead}.tmp"), old);
    // PID 1 always runs; a fresh file may be a live writer's on another host.
    let alive = make(".00002-00-1-b.png.1.tmp".into(), old);
    let fresh = make(format!(".00003-00-1-c.png.{dead}.tmp"), std::time::SystemTime::now());
    let unrelated = make(format!(".notes.{dead}.txt"), old);

    let run = generate(&out, &[], &["--prompt", "a red circle"]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(!stale.exists());
    assert!(
        stderr(&run).contains(&format!("removed {}", stale.display())),
        "{}",
        stderr(&run)
    );
    assert!(alive.exists() && fresh.exists() && unrelated.exists());
}

#[test]
fn manifest_check_names_what_to_requeue_and_merge_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"a red circle\"}\n{\"prompt\": \"a blue square\", \"num_images\": 2}\n{\"prompt\": \"x\", \"colour\": 1}\n",
    )
    .unwrap();
    let p = prompts.to_str().unwrap();
    let out = dir.path().join("out");
    let o = out.to_str().unwrap();
    // Line 3 is bad: reported, skipped, exit 2; the rest is written.
    assert_eq!(generate(&out, &[], &["--prompts", p]).status.code(), Some(2));
    assert_eq!(pngs(&out).len(), 3);
    // A requeued shard that overwrote its images appended a second line for each.
    let _ = generate(&out, &[], &["--prompts", p, "--shard", "0/3", "--overwrite"]);
    let check = |extra: &[&str]| {
        let output = sdfix(&[&["manifest", "check", o, "--prompts", p][..], extra].concat());
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    };
    let (code, report) = check(&["--seed", "3"]);
    assert_eq!(code, Some(0), "{report}");
    assert!(report.contains(&format!("unusable {p}:3")), "{report}");
    assert!(report.contains("manifest: 1 image(s) with several lines"), "{report}");

    // Lose one image, add one from another run (another seed) and one no line asks for.
    let names: Vec<String> = pngs(&out).into_iter().collect();
    std::fs::remove_file(out.join(&names[1])).unwrap();
    std::fs::copy(out.join(&names[0]), out.join("00001-00-99-a-red-circle.png")).unwrap();
    std::fs::copy(out.join(&names[0]), out.join("00007-00-3-a-red-circle.png")).unwrap();
    let (code, report) = check(&["--seed", "3"]);
    assert_eq!(code, Some(2), "{report}");
    assert!(
        report.contains(&format!("missing {p}:2 image 0 (seed 3): a blue square")),
        "{report}"
    );
    assert!(report.contains("orphan 00001-00-99-a-red-circle.png"), "{report}");
    assert!(report.contains("orphan 00007-00-3-a-red-circle.png"), "{report}");
    // Without --seed any seed fills a slot: the copy doubles line 1.
    let (code, report) = check(&[]);
    assert_eq!(code, Some(2));
    assert!(report.contains(&format!("doubled {p}:1 image 0")), "{report}");

    let merge = sdfix(&["manifest", "merge", o]);
    assert!(merge.status.success(), "{}", stderr(&merge));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("manifest.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let files: Vec<&str> = lines.iter().map(|l| l["file"].as_str().unwrap()).collect();
    assert_eq!(files, ["00001-00-3-a-red-circle.png", "00002-01-4-a-blue-square.png"]);
    assert!(stderr(&merge).contains("00007-00-3-a-red-circle.png has no manifest line"));

    let bad = sdfix(&[
        "manifest",
        "check",
        dir.path().join("nowhere").to_str().unwrap(),
        "--prompts",
        p,
    ]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("not a folder"));
}
