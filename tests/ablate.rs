//! `sdfix ablate` on the tiny fixture model: cell count and order, identical noise across a row,
//! the baseline column equal to `generate --baseline`, labels drawn, grid.json true to the files.

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

#[test]
fn an_epsilon_model_shows_the_zero_snr_columns_as_not_applicable() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("grid");
    let run = ablate(&out, &["--num-seeds", "1", "--prediction", "epsilon"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let cells = grid_json(&out)["cells"].as_array().unwrap().clone();
    assert!(cells[0]["file"].is_string());
    for cell in &cells[1..] {
        assert!(cell["error"].as_str().unwrap().contains("v_prediction"), "{cell}");
    }
}
