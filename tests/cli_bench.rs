//! The benchmark stays out of `cargo test`; this smoke test checks it runs and reports its fields.

use std::process::Command;

#[test]
fn bench_tiny_one_step_reports_every_field() {
    let out = Command::new(env!("CARGO_BIN_EXE_sdfix"))
        .args([
            "bench", "--arch", "tiny", "--steps", "1", "--repeat", "1", "--json", "--device", "cpu",
        ])
        .env("SDFIX_CACHE", std::env::temp_dir().join("sdfix-bench-test"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for stage in ["text_encode_ms", "unet_step_ms", "ddim_guidance_ms", "vae_decode_ms"] {
        let median = report[stage]["median"].as_f64().unwrap();
        assert!(
            median > 0.0 && report[stage]["min"].as_f64().unwrap() <= median,
            "{stage}: {report}"
        );
    }
    assert!(report["total_s"].as_f64().unwrap() > 0.0);
    assert!(report["peak_memory_mb"].as_f64().unwrap() > 0.0);
    assert_eq!(
        (report["width"].as_u64(), report["height"].as_u64()),
        (Some(32), Some(32))
    );
}

#[test]
fn bench_profile_splits_each_stage_by_op() {
    let out = Command::new(env!("CARGO_BIN_EXE_sdfix"))
        .args([
            "bench",
            "--arch",
            "tiny",
            "--steps",
            "1",
            "--repeat",
            "1",
            "--json",
            "--device",
            "cpu",
            "--profile",
        ])
        .env("SDFIX_CACHE", std::env::temp_dir().join("sdfix-bench-test"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let unet = report["op_ms"]["unet_step"].as_object().expect("op_ms.unet_step");
    for op in ["conv 3x3", "linear", "attention", "group norm", "other"] {
        assert!(unet.get(op).and_then(|ms| ms.as_f64()).is_some(), "{op} in {unet:?}");
    }
    // The ops' times are parts of the stage's mean time, so they cannot sum past it by much.
    let parts: f64 = unet.values().filter_map(|ms| ms.as_f64()).sum();
    let stage = report["unet_step_ms"]["median"].as_f64().unwrap();
    assert!(parts <= stage * 1.5 + 1.0, "{parts} ms of ops in a {stage} ms step");
    assert!(report["op_ms"]["vae_decode"]["conv 3x3"].as_f64().unwrap() > 0.0);
    assert!(report["op_ms"]["text_encode"]["linear"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_refuses_unknown_architectures() {
    let out = Command::new(env!("CARGO_BIN_EXE_sdfix"))
        .args(["bench", "--arch", "sd9"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--arch sd9"));
}
