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
    for stage in [
        "text_encode_ms",
        "unet_step_ms",
        "unet_submit_ms",
        "ddim_guidance_ms",
        "vae_decode_ms",
    ] {
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

/// `--vae-only` builds and times the VAE decoder alone, whole or tiled (as
/// scripts/vae_tiling_memory.sh runs it at 2048 px).
#[test]
fn bench_vae_only_times_the_decode_whole_and_tiled() {
    for tiled in [false, true] {
        let mut args = vec![
            "bench",
            "--arch",
            "tiny",
            "--vae-only",
            "--width",
            "64",
            "--height",
            "64",
            "--repeat",
            "1",
            "--json",
            "--device",
            "cpu",
        ];
        if tiled {
            args.push("--vae-tiling");
        }
        let out = Command::new(env!("CARGO_BIN_EXE_sdfix"))
            .args(&args)
            .env("SDFIX_CACHE", std::env::temp_dir().join("sdfix-bench-test"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["vae_tiling"], tiled, "{report}");
        assert!(report["vae_decode_ms"]["median"].as_f64().unwrap() > 0.0, "{report}");
        assert!(report["peak_memory_mb"].as_f64().unwrap() > 0.0, "{report}");
        assert!(report.get("unet_step_ms").is_none(), "no UNet: {report}");
    }
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
    // The linear layers by shape ("rows x in x out") add up to the linear total.
    for stage in ["text_encode", "unet_step"] {
        let shapes = report["linear_ms_by_shape"][stage]
            .as_object()
            .expect("linear_ms_by_shape");
        assert!(!shapes.is_empty());
        for (shape, entry) in shapes {
            let dims: Vec<usize> = shape.split('x').filter_map(|d| d.parse().ok()).collect();
            assert_eq!(dims.len(), 3, "{shape}");
            assert!(entry["calls"].as_f64().unwrap() >= 1.0, "{shape}: {entry}");
        }
        let by_shape: f64 = shapes.values().map(|e| e["ms"].as_f64().unwrap()).sum();
        let total = report["op_ms"][stage]["linear"].as_f64().unwrap();
        assert!(
            (by_shape - total).abs() <= 1e-6 * total.max(1.0),
            "{stage}: {by_shape} vs {total}"
        );
    }
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
