//! `sdfix schedule`, run as a user runs it: the binary, its stdout, stderr and exit code.

mod common;

use common::sdfix;

use std::path::Path;

fn json(args: &[&str]) -> serde_json::Value {
    let out = sdfix(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON object")
}

/// Asserts exit code 2, no panic, and a first stderr line that mentions `needle`.
fn assert_fails_naming(args: &[&str], needle: &str) {
    let out = sdfix(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    let first = stderr.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("error:") && first.contains(needle),
        "{args:?}: expected {needle:?} in {first:?}"
    );
    assert!(out.stdout.is_empty(), "{args:?} printed to stdout on error");
}

fn write_model(dir: &Path, scheduler_config: &str) {
    std::fs::create_dir_all(dir.join("scheduler")).unwrap();
    std::fs::write(dir.join("scheduler/scheduler_config.json"), scheduler_config).unwrap();
}

#[test]
fn default_is_sd2_with_the_papers_fixes() {
    let v = json(&["schedule", "--json"]);
    let timesteps = v["timesteps"].as_array().unwrap();
    assert_eq!(timesteps.len(), 50);
    assert_eq!(timesteps[0], 999);
    assert_eq!(timesteps[49], 19);
    assert_eq!(v["alphas_cumprod"].as_array().unwrap().len(), 1000);
    assert_eq!(v["terminal_snr"], 0.0);
    assert_eq!(v["spacing"], "trailing");
}

#[test]
fn stock_leading_schedule_starts_at_981_and_leaks_signal() {
    let v = json(&["schedule", "--json", "--no-zero-snr", "--spacing", "leading"]);
    assert_eq!(v["timesteps"][0], 981);
    let snr = v["terminal_snr"].as_f64().unwrap();
    assert!((snr - 0.004682).abs() < 1e-5, "{snr}");
    assert_eq!(v["terminal_snr_rescaled"], 0.0);
}

#[test]
fn last_zero_snr_flag_wins() {
    let v = json(&["schedule", "--json", "--zero-snr", "--no-zero-snr"]);
    assert_eq!(v["zero_snr"], false);
    let v = json(&["schedule", "--json", "--no-zero-snr", "--zero-snr"]);
    assert_eq!(v["zero_snr"], true);
}

#[test]
fn table_shows_both_terminal_snrs_and_every_step() {
    let out = sdfix(&["schedule", "--steps", "10"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("stock 4.68"), "{text}");
    assert!(text.contains("zero-SNR rescaled 0.000000e0"), "{text}");
    assert!(text.contains("<- in use"));
    let rows = text
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("step"))
        .skip(1)
        .count();
    assert_eq!(rows, 10, "{text}");
}

#[test]
fn reads_the_models_scheduler_config() {
    let dir = tempfile::tempdir().unwrap();
    write_model(
        dir.path(),
        r#"{"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "beta_end": 0.012, "num_train_timesteps": 1000, "steps_offset": 1, "set_alpha_to_one": false,
            "prediction_type": "v_prediction", "rescale_betas_zero_snr": true, "timestep_spacing": "trailing"}"#,
    );
    let model = dir.path().to_str().unwrap();
    let v = json(&["schedule", "--json", "--model", model, "--spacing", "leading"]);
    assert_eq!(v["zero_snr"], true);
    assert_eq!(v["steps_offset"], 1);
    assert_eq!(v["timesteps"][0], 981);
    let v = json(&[
        "schedule",
        "--json",
        "--model",
        model,
        "--no-zero-snr",
        "--steps-offset",
        "0",
    ]);
    assert_eq!(v["zero_snr"], false);
    assert_eq!(v["steps_offset"], 0);
}

#[test]
fn bad_steps_name_the_flag() {
    assert_fails_naming(&["schedule", "--steps", "0"], "--steps");
    assert_fails_naming(&["schedule", "--steps", "2000"], "--steps 2000");
    assert_fails_naming(&["schedule", "--steps", "-3"], "");
    assert_fails_naming(
        &["schedule", "--train-timesteps", "100", "--steps", "101"],
        "--steps 101",
    );
    assert_fails_naming(&["schedule", "--steps", "1000", "--spacing", "leading"], "--steps 1000");
}

#[test]
fn unknown_names_are_rejected() {
    assert_fails_naming(&["schedule", "--spacing", "middle"], "--spacing");
    assert_fails_naming(&["schedule", "--beta-schedule", "cubic"], "--beta-schedule");
}

#[test]
fn reversed_beta_range_names_the_flags() {
    assert_fails_naming(
        &["schedule", "--beta-start", "0.02", "--beta-end", "0.01"],
        "--beta-start",
    );
    assert_fails_naming(&["schedule", "--beta-start", "0", "--beta-end", "0.01"], "--beta-start");
}

#[test]
fn model_conflicts_with_beta_flags() {
    assert_fails_naming(&["schedule", "--model", "x/y", "--beta-start", "0.001"], "--beta-start");
}

#[test]
fn broken_model_folders_name_the_file() {
    let missing = tempfile::tempdir().unwrap();
    assert_fails_naming(
        &["schedule", "--model", missing.path().to_str().unwrap()],
        "scheduler/scheduler_config.json",
    );

    let malformed = tempfile::tempdir().unwrap();
    write_model(malformed.path(), "{ not json");
    assert_fails_naming(
        &["schedule", "--model", malformed.path().to_str().unwrap()],
        "scheduler_config.json",
    );

    let wrong_type = tempfile::tempdir().unwrap();
    write_model(wrong_type.path(), r#"{"num_train_timesteps": "a thousand"}"#);
    assert_fails_naming(
        &["schedule", "--model", wrong_type.path().to_str().unwrap()],
        "scheduler_config.json",
    );

    let bad_schedule = tempfile::tempdir().unwrap();
    write_model(bad_schedule.path(), r#"{"beta_schedule": "cubic"}"#);
    assert_fails_naming(
        &["schedule", "--model", bad_schedule.path().to_str().unwrap()],
        "scheduler_config.json",
    );

    let bad_range = tempfile::tempdir().unwrap();
    write_model(bad_range.path(), r#"{"beta_start": 0.5, "beta_end": 0.1}"#);
    assert_fails_naming(
        &["schedule", "--model", bad_range.path().to_str().unwrap()],
        "scheduler_config.json",
    );
}

#[test]
fn nonexistent_model_is_a_clear_error() {
    assert_fails_naming(
        &["schedule", "--model", "no-such-model-folder"],
        "--model no-such-model-folder",
    );
}
