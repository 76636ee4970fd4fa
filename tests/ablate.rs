//! `sdfix ablate` on the tiny fixture model: cell count and order, identical noise across a row,
//! the baseline column equal to `generate --baseline`, labels drawn, grid.json true to the files;
//! on the demo models: models as an axis, the columns a model can take, and README's picture
//! (scripts/readme_picture.sh) still what the committed docs/ grid.json says.

mod common;

use common::{fixture, sdfix};

use std::path::Path;
use std::process::Output;

fn ablate(out: &Path, extra: &[&str]) -> Output {
    let model = fixture("tiny-sd");
    let mut args = vec![
        "ablate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a red circle",
        "--steps",
        "6",
    ];
    args.extend(["--out-dir", out.to_str().unwrap(), "--quiet"]);
    args.extend(extra);
    sdfix(&args)
}

fn grid_json(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("grid.json")).unwrap()).unwrap()
}

#[test]
fn the_papers_progression_in_order_with_shared_noise_per_row() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("grid");
    let run = ablate(&out, &["--seeds", "3,4"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let report = grid_json(&out);
    assert_eq!(
        report["columns"],
        serde_json::json!(["baseline", "+zero-SNR", "+trailing", "+rescaled CFG"])
    );
    assert_eq!(report["rows"], serde_json::json!(["seed 3", "seed 4"]));
    let cells = report["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 8);
    for (i, cell) in cells.iter().enumerate() {
        assert_eq!(
            (cell["row"].as_u64().unwrap(), cell["column"].as_u64().unwrap()),
            ((i / 4) as u64, (i % 4) as u64)
        );
        let settings = &cell["settings"];
        assert_eq!(settings["seed"], if i < 4 { 3 } else { 4 });
        let (zero_snr, spacing, phi) = match i % 4 {
            0 => (false, "leading", 0.0),
            1 => (true, "leading", 0.0),
            2 => (true, "trailing", 0.0),
            _ => (true, "trailing", 0.7),
        };
        assert_eq!(settings["zero_snr"], zero_snr, "cell {i}");
        assert_eq!(settings["spacing"], spacing, "cell {i}");
        assert_eq!(settings["guidance_rescale"], phi, "cell {i}");
        // grid.json is true to the files.
        let file = out.join(cell["file"].as_str().unwrap());
        let stats = sdfix(&["stats", "--json", file.to_str().unwrap()]);
        let measured: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
        assert_eq!(measured["images"][0]["luminance"], cell["luminance"]);
    }
    // Every cell of a row started from the same noise.
    let manifest = std::fs::read_to_string(out.join("cells/manifest.jsonl")).unwrap();
    let noise: Vec<(u64, f64)> = manifest
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| (v["seed"].as_u64().unwrap(), v["initial_noise_mean"].as_f64().unwrap()))
        .collect();
    assert_eq!(noise.len(), 8);
    for seed in [3, 4] {
        let means: Vec<f64> = noise.iter().filter(|(s, _)| *s == seed).map(|(_, m)| *m).collect();
        assert!(means.iter().all(|m| *m == means[0]), "seed {seed}: {means:?}");
    }
    // The baseline column is exactly what `generate --baseline` makes.
    let model = fixture("tiny-sd");
    let plain = dir.path().join("plain");
    let run = sdfix(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a red circle",
        "--steps",
        "6",
        "--seed",
        "4",
        "--baseline",
        "--out-dir",
        plain.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(run.status.success());
    let generated = std::fs::read(plain.join("00000-00-4-a-red-circle.png")).unwrap();
    let baseline_cell = std::fs::read(out.join(cells[4]["file"].as_str().unwrap())).unwrap();
    assert!(
        generated == baseline_cell,
        "baseline cell differs from generate --baseline"
    );
}

#[test]
fn labels_are_drawn() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("grid");
    assert!(ablate(&out, &["--num-seeds", "1"]).status.success());
    let grid = image::open(out.join("grid.png")).unwrap().to_rgb8();
    // The header row (above the first cell) and the first column hold black text pixels.
    let header_dark = (0..grid.width())
        .flat_map(|x| (0..20).map(move |y| (x, y)))
        .filter(|&(x, y)| grid.get_pixel(x, y).0 == [0, 0, 0])
        .count();
    let column_dark = (0..60)
        .flat_map(|x| (40..100).map(move |y| (x, y)))
        .filter(|&(x, y)| grid.get_pixel(x, y).0 == [0, 0, 0])
        .count();
    assert!(
        header_dark > 50 && column_dark > 20,
        "header {header_dark}, column {column_dark}"
    );
}

#[test]
fn combinations_and_sweeps_shape_the_grid() {
    let dir = tempfile::tempdir().unwrap();
    let all = dir.path().join("all");
    assert!(ablate(&all, &["--num-seeds", "1", "--all-combinations"])
        .status
        .success());
    let report = grid_json(&all);
    assert_eq!(report["columns"].as_array().unwrap().len(), 8);
    assert_eq!(report["columns"][0], "none");
    assert_eq!(report["columns"][7], "zero-SNR+trailing+rescale");

    let swept = dir.path().join("swept");
    let run = ablate(
        &swept,
        &[
            "--num-seeds",
            "2",
            "--sweep",
            "guidance=1,7.5,12",
            "--sweep",
            "guidance-rescale=0,0.7",
        ],
    );
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let report = grid_json(&swept);
    assert_eq!(
        report["columns"],
        serde_json::json!(["guidance=1", "guidance=7.5", "guidance=12"])
    );
    assert_eq!(report["rows"].as_array().unwrap().len(), 4);
    assert_eq!(report["rows"][0], "guidance-rescale=0 seed 0");
    let last = &report["cells"][11]["settings"];
    assert_eq!(
        (last["guidance"].as_f64(), last["guidance_rescale"].as_f64()),
        (Some(12.0), Some(0.7))
    );
}

#[test]
fn big_grids_and_bad_sweeps_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("grid");
    let big = ablate(&out, &["--num-seeds", "17"]);
    assert_eq!(big.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&big.stderr).contains("--max-cells 64"));
    let bad = ablate(&out, &["--sweep", "cfg=1,2"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--sweep"));
}

/// An epsilon model used to get three grey n/a columns (each added zero SNR); now the fixes that
/// apply, with zero SNR skipped and said once.
#[test]
fn an_epsilon_model_gets_the_columns_that_apply() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("grid");
    let run = ablate(&out, &["--num-seeds", "1", "--prediction", "epsilon"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let report = grid_json(&out);
    assert_eq!(
        report["columns"],
        serde_json::json!(["baseline", "+trailing", "+rescaled CFG"])
    );
    let cells = report["cells"].as_array().unwrap();
    let settings: Vec<(bool, &str)> = cells
        .iter()
        .map(|c| {
            let s = &c["settings"];
            (s["zero_snr"].as_bool().unwrap(), s["spacing"].as_str().unwrap())
        })
        .collect();
    assert_eq!(settings, [(false, "leading"), (false, "trailing"), (false, "trailing")]);
    assert_eq!(cells[2]["settings"]["guidance_rescale"], 0.7);
    assert_eq!(report["notes"].as_array().unwrap().len(), 1, "{}", report["notes"]);
}

/// `ablate` on the built-in demo models, 4 steps, into `out`.
fn ablate_demo(out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["ablate", "--prompt", "solid black background", "--steps", "4"];
    args.extend(["--out-dir", out.to_str().unwrap(), "--quiet"]);
    args.extend(extra);
    sdfix(&args)
}

#[test]
fn two_models_are_row_groups_under_the_fix_columns() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("grid");
    let run = ablate_demo(&out, &["--num-seeds", "1", "--sweep", "model=demo-flawed,demo"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let report = grid_json(&out);
    assert_eq!(
        report["columns"],
        serde_json::json!(["baseline", "+zero-SNR", "+trailing", "+rescaled CFG"])
    );
    assert_eq!(
        report["rows"],
        serde_json::json!(["demo-flawed: seed 0", "demo: seed 0"])
    );
    // Each model's identity: what it predicts and whether it was trained with zero SNR.
    let models = report["models"].as_array().unwrap();
    let identity: Vec<_> = models
        .iter()
        .map(|m| (m["name"].clone(), m["prediction_type"].clone(), m["zero_snr"].clone()))
        .collect();
    assert_eq!(
        identity,
        [
            ("demo-flawed".into(), "epsilon".into(), false.into()),
            ("demo".into(), "v_prediction".into(), true.into())
        ]
    );
    assert_eq!(models[0]["source"], "built-in");
    // No n/a or empty cell: demo-flawed's +zero-SNR cell, zero SNR skipped, is its baseline
    // (the same file, made once); its others are made without zero SNR.
    let cells = report["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 8);
    assert!(cells.iter().all(|c| c.get("error").is_none()), "{cells:?}");
    assert!(cells[1]["skipped"].is_string(), "{}", cells[1]);
    assert_eq!(
        (&cells[1]["same_as_column"], &cells[1]["file"]),
        (&0.into(), &cells[0]["file"])
    );
    for (i, cell) in cells.iter().enumerate().filter(|(i, _)| *i != 1) {
        let settings = &cell["settings"];
        assert_eq!(
            settings["model"],
            if i < 4 { "demo-flawed" } else { "demo" },
            "cell {i}"
        );
        assert!(out.join(cell["file"].as_str().unwrap()).is_file(), "cell {i}");
        let zero_snr = i >= 5;
        assert_eq!(settings["zero_snr"], zero_snr, "cell {i}");
    }
    assert_eq!(cells[2]["settings"]["spacing"], "trailing");
    assert_eq!(cells[3]["settings"]["guidance_rescale"], 0.7);
    let notes = report["notes"].as_array().unwrap();
    assert_eq!(notes.len(), 1);
    assert!(
        notes[0]
            .as_str()
            .unwrap()
            .starts_with("zero-SNR skipped for demo-flawed"),
        "{notes:?}"
    );
}

#[test]
fn models_go_with_a_sweep_of_another_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("grid");
    let run = ablate_demo(
        &out,
        &[
            "--seeds",
            "5",
            "--sweep",
            "model=demo-flawed,demo",
            "--sweep",
            "sampler=ddim,euler",
        ],
    );
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let report = grid_json(&out);
    assert_eq!(report["columns"], serde_json::json!(["sampler=ddim", "sampler=euler"]));
    assert_eq!(
        report["rows"],
        serde_json::json!(["demo-flawed: seed 5", "demo: seed 5"])
    );
    let made: Vec<_> = report["cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["settings"]["model"].clone(), c["settings"]["sampler"].clone()))
        .collect();
    assert_eq!(
        made,
        [
            ("demo-flawed".into(), serde_json::Value::Null),
            ("demo-flawed".into(), "euler".into()),
            ("demo".into(), serde_json::Value::Null),
            ("demo".into(), "euler".into()),
        ]
    );
}

/// A folder and a single file in one sweep: named by folder and file stem, the file's hash and
/// detected prediction type recorded, `--config` applied to the file only.
#[test]
fn a_folder_and_a_single_file_in_one_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("grid");
    let (folder, file) = (fixture("tiny-sd"), fixture("single-file/tiny-sd2.safetensors"));
    let sweep = format!("model={},{}", folder.display(), file.display());
    let run = sdfix(&[
        "ablate",
        "--sweep",
        &sweep,
        "--config",
        folder.to_str().unwrap(),
        "--prompt",
        "a red circle",
        "--steps",
        "3",
        "--num-seeds",
        "1",
        "--out-dir",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let report = grid_json(&out);
    assert_eq!(
        report["rows"],
        serde_json::json!(["tiny-sd: seed 0", "tiny-sd2: seed 0"])
    );
    let models = report["models"].as_array().unwrap();
    assert_eq!(
        (&models[0]["source"], &models[0]["hash"]),
        (&"folder".into(), &serde_json::Value::Null)
    );
    assert_eq!(models[1]["source"], "file");
    assert_eq!(models[1]["hash"].as_str().map(str::len), Some(10));
    assert_eq!(models[1]["prediction_type"], "v_prediction");
    assert_eq!(report["cells"].as_array().unwrap().len(), 8);
}

#[test]
fn all_combinations_on_an_epsilon_model_are_the_valid_ones() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("grid");
    let run = ablate_demo(
        &out,
        &["--model", "demo-flawed", "--num-seeds", "1", "--all-combinations"],
    );
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let report = grid_json(&out);
    assert_eq!(
        report["columns"],
        serde_json::json!(["none", "rescale", "trailing", "trailing+rescale"])
    );
    let cells = report["cells"].as_array().unwrap();
    assert!(cells.iter().all(|c| c["file"].is_string()), "{cells:?}");
    assert!(report["notes"][0].as_str().unwrap().contains("left out"));
}

#[test]
fn a_bad_model_in_the_sweep_stops_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("grid");
    let run = ablate_demo(&out, &["--sweep", "model=demo,no-such-model"]);
    assert_eq!(run.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--sweep model=no-such-model"), "{stderr}");
    assert!(!out.exists(), "a folder was made before the error");
}

/// Whether `fresh` (made now) and `committed` (docs/) grid.json agree: models, labels and notes,
/// every cell's place, file and settings (but the version, device and dtype), and luminance to
/// 0.01 (the CPU's float sums may differ in the last digits between machines).
fn same_grid(fresh: &serde_json::Value, committed: &serde_json::Value) -> Result<(), String> {
    for key in ["columns", "rows", "notes"] {
        if fresh[key] != committed[key] {
            return Err(format!("{key}: {} vs {}", fresh[key], committed[key]));
        }
    }
    let models = |v: &serde_json::Value| -> Vec<serde_json::Value> {
        let keep = [
            "name",
            "source",
            "prediction_type",
            "zero_snr",
            "prediction",
            "zero_snr_fix",
        ];
        v["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| keep.iter().map(|k| m[*k].clone()).collect())
            .collect()
    };
    if models(fresh) != models(committed) {
        return Err(format!("models: {:?} vs {:?}", models(fresh), models(committed)));
    }
    let (a, b) = (
        fresh["cells"].as_array().unwrap(),
        committed["cells"].as_array().unwrap(),
    );
    if a.len() != b.len() {
        return Err(format!("{} cells vs {}", a.len(), b.len()));
    }
    for (i, (a, b)) in a.iter().zip(b).enumerate() {
        let strip = |cell: &serde_json::Value| {
            let mut cell = cell.clone();
            let luminance = cell.as_object_mut().unwrap().remove("luminance");
            if let Some(settings) = cell["settings"].as_object_mut() {
                for volatile in ["version", "device", "dtype"] {
                    settings.remove(volatile);
                }
            }
            (cell, luminance.and_then(|l| l.as_f64()))
        };
        let ((a, la), (b, lb)) = (strip(a), strip(b));
        if a != b {
            return Err(format!("cell {i}: {a} vs {b}"));
        }
        match (la, lb) {
            (Some(x), Some(y)) if (x - y).abs() > 0.01 => return Err(format!("cell {i}: luminance {x} vs {y}")),
            (Some(_), None) | (None, Some(_)) => return Err(format!("cell {i}: luminance {la:?} vs {lb:?}")),
            _ => {}
        }
    }
    Ok(())
}

/// README's picture cannot go stale: the script that drew it, run again, makes the grid.json
/// committed beside it.
#[test]
fn the_readme_picture_is_what_its_script_draws() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let run = std::process::Command::new("bash")
        .arg(repo.join("scripts/readme_picture.sh"))
        .arg(dir.path())
        .env("SDFIX", env!("CARGO_BIN_EXE_sdfix"))
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let read =
        |path: &Path| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap() };
    let name = "fixes-demo-flawed-vs-demo.json";
    let (fresh, committed) = (read(&dir.path().join(name)), read(&repo.join("docs").join(name)));
    if let Err(diff) = same_grid(&fresh, &committed) {
        panic!("docs/{name} is stale ({diff}); redraw it: bash scripts/readme_picture.sh");
    }
}
