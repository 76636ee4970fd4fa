//! `sdfix probe` on the built-in demo models: the JSON tells `demo` (zero SNR, v-prediction) from
//! `demo-flawed` (stock epsilon) by what each says of itself and by what each draws; its "own
//! settings" are the model's config as `generate` samples it; bad input is one line and exit 2.

mod common;

use common::sdfix;

use serde_json::Value;

/// Fast settings: 2 seeds, 10 steps (the demo models are 32x32).
fn probe_json(model: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "probe", "--model", model, "--seeds", "2", "--steps", "10", "--json", "--quiet",
    ];
    args.extend(extra);
    let out = sdfix(&args);
    assert!(
        out.status.success(),
        "{model}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn mean(report: &Value, setting: &str, prompt: &str) -> f64 {
    report[setting][prompt]["mean"].as_f64().unwrap()
}

#[test]
fn demo_and_demo_flawed_are_told_apart() {
    let fixed = probe_json("demo", &[]);
    let flawed = probe_json("demo-flawed", &[]);

    // What each says of itself.
    assert_eq!(fixed["prediction"]["type"], "v_prediction");
    assert_eq!(flawed["prediction"]["type"], "epsilon");
    assert_eq!(fixed["zero_snr"]["trained"], true);
    assert_eq!(flawed["zero_snr"]["trained"], false);
    for report in [&fixed, &flawed] {
        let source = report["prediction"]["source"].as_str().unwrap();
        assert!(source.contains("scheduler_config.json"), "{source}");
    }
    assert_eq!(fixed["terminal_snr"]["value"], 0.0);
    // SD's scaled_linear betas 0.00085..0.012: SNR(T) = 0.0047 (README, fix 1).
    let snr = flawed["terminal_snr"]["value"].as_f64().unwrap();
    assert!((snr - 4.68e-3).abs() < 1e-4, "{snr}");
    assert_eq!(flawed["zero_snr"]["applies_at_sampling"], false);
    assert_eq!(flawed["fixed"]["settings"]["zero_snr"], false);
    assert_eq!(flawed["fixed"]["settings"]["spacing"], "trailing");
    assert_eq!(flawed["fixed"]["settings"]["guidance_rescale"], 0.7);
    assert!(flawed["notes"][0].as_str().unwrap().contains("zero SNR skipped"));

    // What each draws: demo black and white far apart, demo-flawed both mid-grey.
    for setting in ["own", "fixed"] {
        assert!(mean(&fixed, setting, "black") < 0.1, "{fixed}");
        assert!(mean(&fixed, setting, "white") > 0.9, "{fixed}");
        assert_eq!(fixed[setting]["draws_black_and_white"], true);
        assert_eq!(flawed[setting]["draws_black_and_white"], false);
        let (gap_fixed, gap_flawed) = (
            fixed[setting]["gap"].as_f64().unwrap(),
            flawed[setting]["gap"].as_f64().unwrap(),
        );
        assert!(
            gap_fixed > 0.8 && gap_flawed.abs() < 0.3,
            "{setting}: {gap_fixed} vs {gap_flawed}"
        );
        assert!(mean(&flawed, setting, "black") > mean(&fixed, setting, "black") + 0.3);
    }

    // The verdicts and advice.
    assert_eq!(fixed["verdict"]["code"], "zero_snr_model");
    assert_eq!(fixed["verdict"]["flawed"], false);
    assert!(fixed["next"].is_null());
    assert_eq!(flawed["verdict"]["code"], "needs_finetune");
    assert_eq!(flawed["verdict"]["flawed"], true);
    let summary = flawed["verdict"]["summary"].as_str().unwrap();
    assert!(
        summary.contains("zero SNR cannot be applied at sampling time"),
        "{summary}"
    );
    assert!(flawed["next"]
        .as_str()
        .unwrap()
        .starts_with("sdfix finetune --model demo-flawed"));
    for report in [&fixed, &flawed] {
        assert_eq!(report["flags"], "--spacing trailing --guidance-rescale 0.7");
    }
}

/// The model's own settings are its scheduler config's, as `generate` samples it without the
/// sampler-side fixes: for demo-flawed exactly `generate --baseline`, image for image.
#[test]
fn own_settings_are_the_models_config_and_the_images_are_generates() {
    let dir = tempfile::tempdir().unwrap();
    let probe_dir = dir.path().join("probe");
    let report = probe_json("demo-flawed", &["--out-dir", probe_dir.to_str().unwrap()]);
    let own = &report["own"]["settings"];
    assert_eq!((&own["spacing"], &own["zero_snr"]), (&"leading".into(), &false.into()));
    assert_eq!(own["guidance_rescale"], 0.0);
    assert_eq!(common::pngs(&probe_dir).len(), 8);

    let generated = dir.path().join("generate");
    let out = sdfix(&[
        "generate",
        "--model",
        "demo-flawed",
        "--baseline",
        "--prompt",
        "solid black background",
        "--seed",
        "0",
        "--num-images",
        "2",
        "--steps",
        "10",
        "--quiet",
        "--out-dir",
        generated.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stats = sdfix(&["stats", "--json", generated.to_str().unwrap()]);
    let stats: Value = serde_json::from_slice(&stats.stdout).unwrap();
    let measured: Vec<f64> = stats["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["luminance"].as_f64().unwrap())
        .collect();
    assert_eq!(report["own"]["black"]["per_seed"], serde_json::json!(measured));
    // The written images are the ones measured.
    let written = probe_dir.join("own-solid-black-background-1.png");
    let stats = sdfix(&["stats", "--json", written.to_str().unwrap()]);
    let stats: Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(stats["images"][0]["luminance"], report["own"]["black"]["per_seed"][1]);
}

#[test]
fn the_report_says_it_in_words() {
    let out = sdfix(&["probe", "--model", "demo-flawed", "--seeds", "1", "--steps", "10", "-q"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "prediction type    epsilon",
        "terminal SNR       4.681917e-3",
        "zero SNR skipped",
        "verdict: has the flaw: stock epsilon model",
        "flags:   sdfix generate --model demo-flawed --spacing trailing --guidance-rescale 0.7",
        "next:    sdfix finetune --model demo-flawed",
    ] {
        assert!(text.contains(expected), "{expected:?} missing from:\n{text}");
    }
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-model");
    for (args, names) in [
        (vec!["--model", missing.to_str().unwrap()], "no-such-model"),
        (vec!["--seeds", "0"], "--seeds 0"),
        // Named as typed, not as the engine's width or height.
        (vec!["--size", "31", "--model", "demo"], "--size: 31"),
    ] {
        let mut all = vec!["probe"];
        all.extend(&args);
        let out = sdfix(&all);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: ") && stderr.contains(names), "{stderr}");
        assert!(out.stdout.is_empty());
    }
}
