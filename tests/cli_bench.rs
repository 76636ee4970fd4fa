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
fn bench_refuses_unknown_architectures() {
    let out = Command::new(env!("CARGO_BIN_EXE_sdfix"))
        .args(["bench", "--arch", "sd9"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--arch sd9"));
}
