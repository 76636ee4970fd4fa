//! `sdfix generate --sampler ...` end to end on the tiny fixture model, against diffusers'
//! Euler, Euler-ancestral, DPM-Solver++ and UniPC schedulers given the same initial latents
//! (tests/fixtures/refs/samplers.*, from `scripts/make_sampler_refs.py`), run with
//! `--terminal-alpha-bar diffusers` (their alpha_bar_T = 2^-24). Deterministic samplers: final
//! latents and PNGs; stochastic ones (diffusers' noise comes from torch): statistics of 16 images.
//! Plus determinism, batching and `--from-image` for the new samplers. Black-box: the binary.

mod common;

use common::{fixture, max_abs_diff, pngs, reference_tensors, sdfix};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Tensor, D};

const REGENERATE: &str = "regenerate with: .venv-oracle/bin/python scripts/make_sampler_refs.py";
/// The bars: final latents within 2e-3 max abs, PNG within 2/255.
const LATENT_TOLERANCE: f32 = 2e-3;
const PIXEL_TOLERANCE: u8 = 2;
/// Stochastic samplers: per-channel mean and std of 16 images' final latents may differ from
/// diffusers' by this fraction of diffusers' overall std (sampling error of two independent
/// noise draws; a wrong noise scale or a missing term moves them by far more).
const STATS_TOLERANCE: f32 = 0.15;

fn refs() -> HashMap<String, Tensor> {
    reference_tensors("samplers")
}

/// Runs one reference case through the binary; returns our final latents and images.
fn run_case(name: &str) -> (Vec<Tensor>, Vec<image::RgbImage>) {
    common::run_reference_case("samplers", name, &[])
}

fn assert_case_matches_diffusers(name: &str) {
    common::assert_reference_case("samplers", name, (LATENT_TOLERANCE, PIXEL_TOLERANCE), REGENERATE);
}

#[test]
fn euler_matches_diffusers_euler_discrete() {
    assert_case_matches_diffusers("euler_all_fixes");
    assert_case_matches_diffusers("euler_no_cfg_20");
}

#[test]
fn euler_matches_diffusers_for_an_epsilon_model_without_zero_snr() {
    assert_case_matches_diffusers("euler_epsilon_no_zero_snr");
}

#[test]
fn dpmpp_2m_matches_diffusers_dpm_solver_multistep() {
    assert_case_matches_diffusers("dpmpp_2m_all_fixes");
    assert_case_matches_diffusers("dpmpp_2m_non_square_25");
}

#[test]
fn dpmpp_2m_matches_diffusers_for_an_epsilon_model_without_zero_snr() {
    assert_case_matches_diffusers("dpmpp_2m_epsilon_no_zero_snr");
}

#[test]
fn unipc_matches_diffusers_unipc_multistep() {
    assert_case_matches_diffusers("unipc_all_fixes");
    assert_case_matches_diffusers("unipc_non_square_25");
}

#[test]
fn unipc_matches_diffusers_for_an_epsilon_model_without_zero_snr() {
    assert_case_matches_diffusers("unipc_epsilon_no_zero_snr");
}

/// Karras noise levels with Euler, against diffusers' `EulerDiscreteScheduler` with
/// `use_karras_sigmas` (and its `sigma_min` set to sigma(t = 0), see docs/compatibility.md).
#[test]
fn euler_with_karras_sigmas_matches_diffusers() {
    assert_case_matches_diffusers("euler_karras");
}

/// Final latents of the Euler ramp cases against diffusers within this (max abs), tighter than
/// [`LATENT_TOLERANCE`]: each step is the same arithmetic as diffusers' up to f32 rounding, so a
/// wrong ramp end or a wrong start (e.g. diffusers' trailing `init_noise_sigma` = sigma_max
/// instead of sqrt(sigma_max^2 + 1), 0.23% of x_T on the stock schedule) shows at 1e-2.
const RAMP_LATENT_TOLERANCE: f32 = 1e-4;

fn assert_ramp_case_matches_diffusers(name: &str) {
    common::assert_reference_case("samplers", name, (RAMP_LATENT_TOLERANCE, PIXEL_TOLERANCE), REGENERATE);
}

/// Karras noise levels with Euler on the stock schedule (`--no-zero-snr`, finite sigma_max =
/// sigma(999) = 14.61), against diffusers' `EulerDiscreteScheduler` with `use_karras_sigmas`
/// and `sigma_min` = sigma(t = 0).
#[test]
fn euler_with_karras_sigmas_matches_diffusers_on_the_stock_schedule() {
    assert_ramp_case_matches_diffusers("euler_karras_stock");
}

/// `--sigma-range spacing` reproduces diffusers' Euler defaults, whose Karras / exponential ramp
/// runs between the sigmas of the first and last spaced timesteps: zero SNR and stock (trailing),
/// and exponential with leading spacing (both ends inside (0, T - 1)).
#[test]
fn sigma_range_spacing_matches_diffusers_euler_defaults() {
    for name in [
        "euler_karras_spacing",
        "euler_karras_stock_spacing",
        "euler_exponential_leading_spacing",
    ] {
        assert_ramp_case_matches_diffusers(name);
    }
}

/// Karras and exponential noise levels, against diffusers' DPM-Solver++ sigmas and step with the
/// UNet given each level's fractional timestep (see scripts/make_sampler_refs.py).
#[test]
fn dpmpp_2m_with_karras_and_exponential_sigmas_matches_diffusers() {
    assert_case_matches_diffusers("dpmpp_2m_karras");
    assert_case_matches_diffusers("dpmpp_2m_exponential");
}

/// Per-channel mean and std over images and pixels of (n, c, h, w) latents.
fn channel_stats(latents: &Tensor) -> (Vec<f32>, Vec<f32>) {
    let per_channel = latents.transpose(0, 1).unwrap().flatten_from(1).unwrap(); // (c, n h w)
    let mean = per_channel.mean_keepdim(D::Minus1).unwrap();
    let std = per_channel
        .broadcast_sub(&mean)
        .unwrap()
        .sqr()
        .unwrap()
        .mean(D::Minus1)
        .unwrap()
        .sqrt()
        .unwrap();
    (mean.flatten_all().unwrap().to_vec1().unwrap(), std.to_vec1().unwrap())
}

fn assert_statistics_match_diffusers(name: &str) {
    let refs = refs();
    let (latents, _) = run_case(name);
    let ours = Tensor::stack(&latents, 0).unwrap();
    let theirs = &refs[&format!("{name}.final")];
    let scale = theirs
        .flatten_all()
        .unwrap()
        .var(0)
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let ((mean_a, std_a), (mean_b, std_b)) = (channel_stats(&ours), channel_stats(theirs));
    eprintln!("{name}: ours mean {mean_a:.4?} std {std_a:.4?}; diffusers mean {mean_b:.4?} std {std_b:.4?}");
    for c in 0..mean_a.len() {
        let (dm, ds) = (
            (mean_a[c] - mean_b[c]).abs() / scale,
            (std_a[c] - std_b[c]).abs() / scale,
        );
        assert!(
            dm <= STATS_TOLERANCE && ds <= STATS_TOLERANCE,
            "{name} channel {c}: mean off by {dm:.3}, std by {ds:.3} of diffusers' std; {REGENERATE}"
        );
    }
    // The noise is fresh per image: the 16 results are not one image repeated.
    assert!(
        max_abs_diff(&latents[0], &latents[1]) > 1e-2,
        "{name}: images 0 and 1 are equal"
    );
}

#[test]
fn euler_ancestral_statistics_match_diffusers() {
    assert_statistics_match_diffusers("euler_a_stats");
}

#[test]
fn dpmpp_2m_sde_statistics_match_diffusers() {
    assert_statistics_match_diffusers("dpmpp_2m_sde_stats");
}

fn generate(out_dir: &Path, extra: &[&str]) -> Vec<PathBuf> {
    let model = fixture("tiny-sd");
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a red circle",
        "--steps",
        "6",
        "--quiet",
        "--out-dir",
        out_dir.to_str().unwrap(),
    ];
    args.extend(extra);
    let out = sdfix(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    pngs(out_dir)
}

fn bytes(paths: &[PathBuf]) -> Vec<Vec<u8>> {
    paths.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// The stochastic samplers' step noise comes from each image's seed: the same in any batch, and
/// `--from-image` makes the same bytes; the PNG names the sampler the A1111 way.
#[test]
fn stochastic_samplers_reproduce_from_the_seed() {
    for (sampler, a1111) in [
        ("euler_a", "Sampler: Euler a,"),
        ("dpmpp_2m_sde", "Sampler: DPM++ 2M SDE,"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let batched = generate(
            &dir.path().join("a"),
            &[
                "--sampler",
                sampler,
                "--seed",
                "7",
                "--num-images",
                "2",
                "--batch-size",
                "2",
            ],
        );
        let alone = generate(&dir.path().join("b"), &["--sampler", sampler, "--seed", "8"]);
        assert_eq!(
            bytes(&batched)[1],
            bytes(&alone)[0],
            "{sampler}: seed 8 alone and in a batch"
        );
        let again = dir.path().join("c");
        let out = sdfix(&[
            "generate",
            "--from-image",
            alone[0].to_str().unwrap(),
            "--quiet",
            "--out-dir",
            again.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(bytes(&pngs(&again)), bytes(&alone), "{sampler}: --from-image");
        let info = sdfix(&["info", alone[0].to_str().unwrap()]);
        let text = String::from_utf8_lossy(&info.stdout);
        assert!(text.contains(a1111), "{sampler}: {text}");
    }
}

/// Images with different samplers in one prompt file never share a UNet batch: each equals the
/// image made alone.
#[test]
fn samplers_do_not_share_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"a red circle\", \"seed\": 3}\n{\"prompt\": \"a red circle\", \"seed\": 4, \"sampler\": \"dpmpp_2m\"}\n",
    )
    .unwrap();
    let model = fixture("tiny-sd");
    let out_dir = dir.path().join("both");
    let args = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--steps",
        "6",
        "--batch-size",
        "2",
        "--quiet",
        "--out-dir",
        out_dir.to_str().unwrap(),
    ];
    let out = sdfix(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let both = bytes(&pngs(&out_dir));
    let alone = generate(&dir.path().join("alone"), &["--sampler", "dpmpp_2m", "--seed", "4"]);
    let alone_pixels = image::open(&alone[0]).unwrap().to_rgb8().into_raw();
    let both_pixels = image::load_from_memory(&both[1]).unwrap().to_rgb8().into_raw();
    assert!(
        alone_pixels == both_pixels,
        "the dpmpp_2m line was sampled with another sampler"
    );
}

#[test]
fn bad_sampler_flags_are_refused_with_the_fix() {
    let model = fixture("tiny-sd");
    for (extra, needle) in [
        (&["--sampler", "heun"][..], "--sampler"),
        (&["--terminal-alpha-bar", "tiny"][..], "--terminal-alpha-bar"),
        (&["--sampler", "euler", "--eta", "0.5"][..], "--eta"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec!["generate", "--model", model.to_str().unwrap(), "--prompt", "x"];
        args.extend(["--out-dir", dir.path().to_str().unwrap()]);
        args.extend(extra);
        let out = sdfix(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(stderr.contains(needle), "{extra:?}: {stderr}");
    }
}

/// `ablate --sweep sampler=...`: one column per sampler, each cell recording its sampler; the
/// ddim cell records none (ddim is implied).
#[test]
fn ablate_sweeps_samplers() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("grid");
    let model = fixture("tiny-sd");
    let out = sdfix(&[
        "ablate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a red circle",
        "--steps",
        "4",
        "--num-seeds",
        "1",
        "--sweep",
        "sampler=ddim,euler,dpmpp_2m",
        "--quiet",
        "--out-dir",
        out_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("grid.json")).unwrap()).unwrap();
    assert_eq!(
        report["columns"],
        serde_json::json!(["sampler=ddim", "sampler=euler", "sampler=dpmpp_2m"])
    );
    let recorded: Vec<_> = (0..3)
        .map(|c| report["cells"][c]["settings"]["sampler"].clone())
        .collect();
    assert_eq!(recorded, [serde_json::Value::Null, "euler".into(), "dpmpp_2m".into()]);
}

/// `--sigmas karras` with zero SNR and `--terminal-alpha-bar exact` warns once and clamps as
/// ComfyUI does; the image records it (`Schedule type: Karras`) and `--from-image` re-runs it.
#[test]
fn karras_sigmas_at_zero_snr_warn_and_reproduce() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-sd");
    let first = dir.path().join("a");
    let out = sdfix(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a red circle",
        "--steps",
        "6",
        "--seed",
        "2",
        "--sampler",
        "euler",
        "--sigmas",
        "karras",
        "--out-dir",
        first.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.matches("needs a finite sigma_max").count(), 1, "{stderr}");
    let made = pngs(&first);
    let info = String::from_utf8_lossy(&sdfix(&["info", made[0].to_str().unwrap()]).stdout).into_owned();
    assert!(
        info.contains("Schedule type: Karras,") && info.contains("Terminal alpha_bar: comfy"),
        "{info}"
    );
    let again = dir.path().join("b");
    let out = sdfix(&[
        "generate",
        "--from-image",
        made[0].to_str().unwrap(),
        "--quiet",
        "--out-dir",
        again.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(bytes(&pngs(&again)), bytes(&made));
}
