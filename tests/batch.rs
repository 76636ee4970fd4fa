//! Batch runs of `sdfix generate` on the tiny fixture model: prompt files, output names, the
//! manifest, resuming, sharding, PNG metadata, --from-image, and killed runs. Black-box.

mod common;

use common::{fixture, sdfix};

use std::path::Path;
use std::process::{Command, Output, Stdio};

/// `generate` on the tiny model with a few steps and fixed seed, plus `extra`.
fn generate(out_dir: &Path, extra: &[&str]) -> Output {
    let model = fixture("tiny-sd");
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--steps",
        "6",
        "--seed",
        "10",
    ];
    args.extend(["--out-dir", out_dir.to_str().unwrap()]);
    args.extend(extra);
    sdfix(&args)
}

fn files(dir: &Path, extension: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(extension))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn manifest(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("manifest.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("manifest lines are JSON"))
        .collect()
}

const TXT: &str = "# brightness prompts\n\nsolid black background\n   \na white background\n# done\na red circle\n";

#[test]
fn a_txt_file_makes_one_image_per_prompt_line() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.txt");
    std::fs::write(&prompts, TXT).unwrap();
    let out = dir.path().join("out");
    let run = generate(&out, &["--prompts", prompts.to_str().unwrap(), "--batch-size", "2"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(
        files(&out, ".png"),
        [
            "00003-00-10-solid-black-background.png",
            "00005-00-10-a-white-background.png",
            "00007-00-10-a-red-circle.png"
        ]
    );
    let lines = manifest(&out);
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["prompt"], "solid black background");
    assert_eq!(lines[0]["line"], 3);
    assert_eq!(lines[1]["settings"]["spacing"], "trailing");
    assert!(lines[2]["seconds"].as_f64().unwrap() >= 0.0);
}

#[test]
fn a_bad_jsonl_line_is_reported_and_the_rest_runs() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.jsonl");
    let text = r#"# per-line settings
{"prompt": "a red circle", "seed": 3, "num_images": 2}

{"prompt": "a blue square", "colour": "blue"}
{"prompt": "solid black background", "spacing": "leading", "zero_snr": false, "guidance": 5}
{"prompt": "a green square", "width": 24, "height": 16}
{"prompt": "x", "width": 21}
"#;
    std::fs::write(&prompts, text).unwrap();
    let out = dir.path().join("out");
    let run = generate(&out, &["--prompts", prompts.to_str().unwrap(), "--batch-size", "4"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:4: unknown key \"colour\"", prompts.display())),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{}:7: \"width\": 21 must be a positive multiple",
            prompts.display()
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("wrote 4 image(s)") && stderr.contains("2 prompt line(s) failed"),
        "{stderr}"
    );
    assert_eq!(
        files(&out, ".png"),
        [
            "00002-00-3-a-red-circle.png",
            "00002-01-4-a-red-circle.png",
            "00005-00-10-solid-black-background.png",
            "00006-00-10-a-green-square.png",
        ]
    );
    let lines = manifest(&out);
    assert_eq!(lines.len(), 4);
    let black = lines.iter().find(|l| l["line"] == 5).unwrap();
    assert_eq!(black["settings"]["spacing"], "leading");
    assert_eq!(black["settings"]["zero_snr"], false);
    assert_eq!(black["settings"]["guidance"], 5.0);
    let green = image::open(out.join("00006-00-10-a-green-square.png")).unwrap();
    assert_eq!((green.width(), green.height()), (24, 16));
}

#[test]
fn skip_existing_resumes_without_writing_again() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.txt");
    std::fs::write(&prompts, TXT).unwrap();
    let out = dir.path().join("out");
    assert!(generate(&out, &["--prompts", prompts.to_str().unwrap()])
        .status
        .success());
    // Lose one image, as a preempted worker would.
    std::fs::remove_file(out.join("00005-00-10-a-white-background.png")).unwrap();
    let run = generate(&out, &["--prompts", prompts.to_str().unwrap(), "--skip-existing"]);
    assert!(run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("wrote 1 image(s)"));
    assert_eq!(files(&out, ".png").len(), 3);
    assert_eq!(manifest(&out).len(), 4);
    let again = generate(&out, &["--prompts", prompts.to_str().unwrap(), "--skip-existing"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("wrote 0 image(s)"));
    assert_eq!(manifest(&out).len(), 4);
    // Without either flag, existing images are an error before any work.
    let refused = generate(&out, &["--prompts", prompts.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--skip-existing"));
}

#[test]
fn shards_together_equal_the_whole_run() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.txt");
    std::fs::write(&prompts, "a\nb red circle\nc white\nd black\ne square\n").unwrap();
    let whole = dir.path().join("whole");
    let sharded = dir.path().join("sharded");
    assert!(
        generate(&whole, &["--prompts", prompts.to_str().unwrap(), "--batch-size", "3"])
            .status
            .success()
    );
    for shard in ["0/2", "1/2"] {
        let run = generate(&sharded, &["--prompts", prompts.to_str().unwrap(), "--shard", shard]);
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    }
    let names = files(&whole, ".png");
    assert_eq!(names.len(), 5);
    assert_eq!(files(&sharded, ".png"), names);
    for name in &names {
        assert!(
            std::fs::read(whole.join(name)).unwrap() == std::fs::read(sharded.join(name)).unwrap(),
            "{name} differs"
        );
    }
    let bad = generate(&sharded, &["--prompts", prompts.to_str().unwrap(), "--shard", "2/2"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--shard"));
}

#[test]
fn info_reads_back_the_parameters_and_from_image_makes_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let run = generate(
        &out,
        &[
            "--prompt",
            "東京 at night",
            "--negative-prompt",
            "blurry",
            "--guidance",
            "6",
        ],
    );
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let image = out.join(&files(&out, ".png")[0]);

    let info = sdfix(&["info", image.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(info.status.success());
    assert!(text.contains("parameters:\n東京 at night\nNegative prompt: blurry\nSteps: 6, Sampler: DDIM, Schedule type: Trailing, CFG scale: 6, Seed: 10, Size: 16x16, Model: tiny-sd, Rescale CFG: 0.7, Noise Schedule: Zero Terminal SNR"), "{text}");
    let json = sdfix(&["info", "--json", image.to_str().unwrap()]);
    let settings: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(settings["negative_prompt"], "blurry");
    assert_eq!(settings["scheduler"]["timesteps"][0], 999);

    let again = dir.path().join("again");
    let rerun = sdfix(&[
        "generate",
        "--from-image",
        image.to_str().unwrap(),
        "--out-dir",
        again.to_str().unwrap(),
    ]);
    assert!(rerun.status.success(), "{}", String::from_utf8_lossy(&rerun.stderr));
    let copy = again.join(&files(&again, ".png")[0]);
    assert_eq!(copy.file_name(), image.file_name());
    assert!(
        std::fs::read(&copy).unwrap() == std::fs::read(&image).unwrap(),
        "--from-image made different bytes"
    );
}

#[test]
fn prompts_from_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let model = fixture("tiny-sd");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sdfix"))
        .args([
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--steps",
            "4",
            "--seed",
            "1",
            "--prompts",
            "-",
        ])
        .args(["--out-dir", out.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"prompt\": \"a red circle\", \"seed\": 5}\n")
        .unwrap();
    let done = child.wait_with_output().unwrap();
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    assert_eq!(files(&out, ".png"), ["00001-00-5-a-red-circle.png"]);
}

#[test]
fn a_killed_run_leaves_no_partial_png() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let model = fixture("tiny-sd");
    let prompts = dir.path().join("p.txt");
    std::fs::write(&prompts, "a red circle\n".repeat(400)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sdfix"))
        .args([
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--steps",
            "20",
            "--seed",
            "1",
        ])
        .args([
            "--prompts",
            prompts.to_str().unwrap(),
            "--out-dir",
            out.to_str().unwrap(),
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once a few images are out, while it is writing more.
    let started = std::time::Instant::now();
    while files(&out, ".png").len() < 3 && started.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let written = files(&out, ".png");
    assert!(written.len() >= 3 && written.len() < 400, "{} images", written.len());
    for name in &written {
        let decoded = image::open(out.join(name));
        assert!(decoded.is_ok(), "{name} is not a complete PNG");
    }
    // Every manifest line names a complete image.
    for line in manifest(&out) {
        assert!(written.contains(&line["file"].as_str().unwrap().to_string()));
    }
}

#[test]
fn a_long_prompt_file_encodes_as_it_goes_with_the_same_images() {
    // Over 64 distinct texts the text encoder stays loaded and encodes per batch (its cache
    // bounded); a short run encodes first and frees it. Same pixels either way.
    let dir = tempfile::tempdir().unwrap();
    let mut lines: Vec<String> = vec!["solid black background".into()];
    lines.extend((1..70).map(|i| format!("prompt number {i}")));
    lines.push("solid black background".into());
    let prompts = dir.path().join("long.txt");
    std::fs::write(&prompts, lines.join("\n")).unwrap();
    let long = dir.path().join("long");
    let run = generate(&long, &["--prompts", prompts.to_str().unwrap(), "--verbose"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(!String::from_utf8_lossy(&run.stderr).contains("text encoder freed"));
    let short = dir.path().join("short");
    let run = generate(&short, &["--prompt", "solid black background", "--verbose"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(String::from_utf8_lossy(&run.stderr).contains("encoded 2 text(s)"));

    let pixels = |path: std::path::PathBuf| image::open(path).unwrap().to_rgb8().into_raw();
    let names = files(&long, ".png");
    assert_eq!(names.len(), 71);
    let alone = pixels(short.join(&files(&short, ".png")[0]));
    assert_eq!(pixels(long.join(&names[0])), alone, "line 1");
    assert_eq!(
        pixels(long.join(&names[70])),
        alone,
        "line 71, after the cache was cleared"
    );
    assert_ne!(pixels(long.join(&names[1])), alone);
}
