//! The index of named regressions: each bug sdfix (or a library it was checked against) had, as a
//! test that fails if it comes back, with its cause in a comment. Unit tests in the modules pin
//! the details; these pin the behaviour a user sees.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{fixture, sdfix};
use sdfix::engine::{Engine, Request, Words};
use sdfix::sampling::Prediction;
use sdfix::schedule::{BetaSchedule, BetaSource, Schedule, ScheduleSpec, TimestepSpacing};

fn schedule(spacing: TimestepSpacing, steps: usize) -> Schedule {
    Schedule::new(&ScheduleSpec {
        betas: BetaSource::STABLE_DIFFUSION,
        zero_terminal_snr: true,
        spacing,
        steps,
        steps_offset: 1,
        set_alpha_to_one: false,
    })
    .unwrap()
}

/// candle-transformers' cosine schedule computes `i / T` in integers, so every t but the last is
/// 0 and the betas come out constant. Ours evaluates alpha_bar at real-valued t, as diffusers.
#[test]
fn cosine_betas_are_not_constant_integer_division() {
    let betas = BetaSource::Named {
        schedule: BetaSchedule::SquaredCosCapV2,
        beta_start: 0.0,
        beta_end: 0.0,
        train_timesteps: 1000,
    }
    .betas()
    .unwrap();
    assert!(betas[0] < 1e-4 && betas[998] > 0.1, "{} .. {}", betas[0], betas[998]);
    assert!(betas.windows(2).all(|w| w[1] >= w[0]), "cosine betas grow with t");
}

/// diffusers' trailing spacing is `round(arange(T, 0, -T / n)) - 1`; the float `arange` yields
/// 62 values for n = 61 (T = 1000), the last one -1. We yield exactly n, all valid timesteps.
#[test]
fn trailing_with_61_steps_has_61_timesteps_not_62() {
    let s = schedule(TimestepSpacing::Trailing, 61);
    assert_eq!(s.timesteps.len(), 61);
    assert_eq!(s.timesteps[0], 999);
    assert!(s.timesteps.windows(2).all(|w| w[0] > w[1]), "{:?}", s.timesteps);
}

/// diffusers' DDIM takes alpha_bar_prev at `t - T / n`, a timestep the sampler never visits when
/// n does not divide T (n = 7 here). We step to the next timestep in the list, so the last step
/// lands on the final alpha_bar and no step skips or repeats noise levels.
#[test]
fn seven_trailing_steps_step_to_the_next_visited_timestep() {
    let s = schedule(TimestepSpacing::Trailing, 7);
    for i in 0..6 {
        assert_eq!(s.prev_alpha_cumprod(i), s.alpha_cumprod(i + 1), "step {i}");
    }
    assert_eq!(s.prev_alpha_cumprod(6), s.final_alpha_cumprod);
}

/// With zero terminal SNR, epsilon prediction divides by sqrt(alpha_bar_T) = 0 at the first step
/// and yields NaN images; asking for it is an error naming the fix, caught before any weight loads.
#[test]
fn epsilon_with_zero_snr_is_refused_before_loading() {
    let model = fixture("tiny-sd");
    let engine = Engine::open(
        model.to_str().unwrap(),
        None,
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    let err = engine
        .job(Request {
            zero_snr: Some(true),
            prediction: Some(Prediction::Epsilon),
            ..Request::new("a red circle")
        })
        .unwrap_err();
    // Named in the caller's words: a flag on the command line, a key in a prompt file.
    assert!(err.render(Words::Flags).contains("--no-zero-snr"), "{err}");
    assert!(format!("{err}").contains("\"zero_snr\": false"), "{err}");
}

/// `ablate` used to render through `generate`'s writer, which appends to the folder's manifest:
/// `ablate --overwrite` run twice left two lines per cell in cells/manifest.jsonl.
#[test]
fn ablate_overwrite_twice_keeps_one_manifest_line_per_cell() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("grid");
    let model = fixture("tiny-sd");
    for _ in 0..2 {
        let run = sdfix(&[
            "ablate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a red circle",
            "--steps",
            "3",
            "--num-seeds",
            "1",
            "--overwrite",
            "--quiet",
            "--out-dir",
            out.to_str().unwrap(),
        ]);
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    }
    let manifest = std::fs::read_to_string(out.join("cells/manifest.jsonl")).unwrap();
    assert_eq!(manifest.lines().count(), 4, "{manifest}");
}

/// A prompt file with nothing to draw used to print "wrote 0 image(s)" and exit 0, so a typo'd
/// or empty file in a batch job went unnoticed.
#[test]
fn a_prompt_file_without_prompts_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-sd");
    for (name, text) in [("empty.txt", ""), ("comments.txt", "# only a comment\n\n   \n")] {
        let file = dir.path().join(name);
        std::fs::write(&file, text).unwrap();
        let out = sdfix(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompts",
            file.to_str().unwrap(),
            "--out-dir",
            dir.path().join("out").to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(stderr.contains("has no prompts"), "{name}: {stderr}");
        assert!(!dir.path().join("out").exists(), "{name}: nothing should be written");
    }
    // A shard that gets no entries of a non-empty file is a normal, successful worker.
    let file = dir.path().join("one.txt");
    std::fs::write(&file, "a red circle\n").unwrap();
    let out = sdfix(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompts",
        file.to_str().unwrap(),
        "--shard",
        "1/2",
        "--steps",
        "2",
        "--out-dir",
        dir.path().join("shard").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrote 0 image(s)"));
}

/// With no network, a hub id printed hf-hub's transport error chain, the same DNS message three
/// times. Now: one line saying the hub cannot be reached, the root cause once, and what to do.
/// The "hub" is a closed port on loopback.
#[test]
fn an_unreachable_hub_is_one_short_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sdfix"))
        .args(["generate", "--model", "sdfix-test/not-cached", "--prompt", "x"])
        .env("HF_HOME", dir.path())
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: cannot reach the Hugging Face hub for sdfix-test/not-cached: "),
        "{stderr}"
    );
    assert!(stderr.contains("HF_HUB_OFFLINE=1"), "{stderr}");
}

/// Runs sdfix with a stdout whose reader is already gone, as `sdfix stats DIR | head -1` leaves it
/// once head exits; `println!` used to panic there ("failed printing to stdout").
fn with_closed_stdout(args: &[&str]) -> std::process::Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    Command::new(env!("CARGO_BIN_EXE_sdfix"))
        .args(args)
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
        .wait_with_output()
        .unwrap()
}

#[test]
fn a_closed_stdout_exits_zero_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("grey.png");
    image::RgbImage::from_pixel(4, 4, image::Rgb([128, 128, 128]))
        .save(&png)
        .unwrap();
    let png = png.to_str().unwrap();
    for args in [
        vec!["stats", png, png, png],
        vec!["info", png],
        vec!["schedule", "--steps", "50"],
    ] {
        let out = with_closed_stdout(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
    assert!(Path::new(png).exists());
}

/// Images were grouped into UNet batches by timesteps, guidance, eta, prediction and size, but not
/// by the noise schedule: two prompt-file lines differing only in `zero_snr` shared a batch and
/// the second was sampled with the first one's schedule (with `--batch-size` > 1; `ablate
/// --batch-size 4` mixed its `baseline` and `+zero-SNR` cells the same way). The batch key now
/// holds the sampler, zero SNR, alpha_bar_T and the noise levels.
#[test]
fn lines_differing_only_in_zero_snr_do_not_share_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"a red circle\", \"seed\": 3, \"zero_snr\": false}\n{\"prompt\": \"a red circle\", \"seed\": 4}\n",
    )
    .unwrap();
    let model = fixture("tiny-sd");
    let run = |out: &Path, input: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--steps",
            "6",
            "--quiet",
        ];
        args.extend(["--batch-size", "2", "--out-dir", out.to_str().unwrap()]);
        args.extend(input);
        let result = sdfix(&args);
        assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    };
    let (both, alone) = (dir.path().join("both"), dir.path().join("alone"));
    run(&both, &["--prompts", prompts.to_str().unwrap()]);
    run(&alone, &["--prompt", "a red circle", "--seed", "4"]);
    let pixels = |p: std::path::PathBuf| image::open(p).unwrap().to_rgb8().into_raw();
    assert!(
        pixels(both.join("00002-00-4-a-red-circle.png")) == pixels(alone.join("00000-00-4-a-red-circle.png")),
        "the zero-SNR line was sampled with the other line's schedule"
    );
}

/// Every line's PNGs at `--batch-size 2`, in both line orders, equal its PNGs at
/// `--batch-size 1`.
fn assert_batching_changes_nothing(model: &str, lines: [&str; 2]) {
    let dir = tempfile::tempdir().unwrap();
    common::write_pictures(dir.path());
    let lines: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    let flags = ["--steps", "4", "--seed", "5"];
    let alone = common::run_prompt_lines(dir.path(), model, &lines, 1, &flags);
    for order in [lines.clone(), lines.iter().rev().cloned().collect()] {
        let batched = common::run_prompt_lines(dir.path(), model, &order, 2, &flags);
        for line in &lines {
            assert!(
                batched[line] == alone[line],
                "{line}: --batch-size 2 differs from 1 ({order:?})"
            );
        }
    }
}

/// The batch key was a formatted string without the init picture or the mask, so a text line
/// and an img2img line batched together: the img2img line's picture was ignored (its pixels
/// were the text line's, its PNG said `Denoising strength: 1`), and in the other order the run
/// failed with "internal: a batch mixes text to image and img2img". The key is now a struct
/// with the batch's mode.
#[test]
fn text_and_img2img_lines_never_share_a_batch() {
    assert_batching_changes_nothing(
        "demo-flawed",
        [
            r#"{"prompt": "solid white background"}"#,
            r#"{"prompt": "solid white background", "init_image": "grey.png", "strength": 1.0}"#,
        ],
    );
}

/// The same key let an img2img line and an inpainting line at the same strength share a batch:
/// the inpainting picture differed from its batch-of-one picture, or, reversed, "internal: a
/// batch mixes img2img and inpainting".
#[test]
fn img2img_and_inpainting_lines_never_share_a_batch() {
    assert_batching_changes_nothing(
        "demo-flawed",
        [
            r#"{"prompt": "a red circle", "init_image": "grey.png", "strength": 0.75}"#,
            r#"{"prompt": "a red circle", "init_image": "grey.png", "mask": "mask.png", "strength": 0.75}"#,
        ],
    );
}

/// `--vae-encode` is per batch (the pictures are encoded together), so it is part of the key.
#[test]
fn vae_encode_modes_never_share_a_batch() {
    assert_batching_changes_nothing(
        "demo",
        [
            r#"{"prompt": "a red circle", "init_image": "ramp.png", "strength": 0.5, "vae_encode": "mean"}"#,
            r#"{"prompt": "a red circle", "init_image": "ramp.png", "strength": 0.5}"#,
        ],
    );
}

/// Stock Euler with Karras sigmas (`--no-zero-snr --sigmas karras --sampler euler`) was reported
/// 1.2e-2 off diffusers' `EulerDiscreteScheduler(use_karras_sigmas=True, sigma_min=sigma(0))`
/// while the zero-SNR case matched to 1.6e-4. Measured step by step (sigmas, the UNet's
/// fractional timesteps and inputs agree to 4e-7, 6e-4 and 5e-5), the gap was the start: for
/// trailing spacing diffusers' `init_noise_sigma` is sigma_max, not sqrt(sigma_max^2 + 1), so
/// the same noise z starts it at 0.99767 z in variance-preserving terms (sigma_max = 14.61);
/// at zero SNR (sigma_max = 4096) that factor is 1 - 3e-8, hence no gap there. Fed the same
/// start (scripts/make_sampler_refs.py scales diffusers' latents, docs/compatibility.md), stock
/// Euler Karras equals diffusers within 1e-4, and `--sigma-range spacing` equals diffusers'
/// defaults (the ramp between the spaced timesteps' sigmas).
#[test]
fn stock_euler_with_karras_sigmas_equals_diffusers() {
    const REGENERATE: &str = "regenerate with: .venv-oracle/bin/python scripts/make_sampler_refs.py";
    for case in [
        "euler_karras_stock",
        "euler_karras_stock_spacing",
        "euler_karras_spacing",
    ] {
        common::assert_reference_case("samplers", case, (1e-4, 2), REGENERATE);
    }
}

/// The zero-SNR clamp (`--terminal-alpha-bar comfy`, with a warning) was applied to every
/// Karras or exponential ramp, also to one between spaced timesteps below T (`--sigma-range
/// spacing` with leading spacing), whose sigma_max is finite: nothing to clamp there.
#[test]
fn a_ramp_below_t_needs_no_terminal_clamp() {
    use sdfix::schedule::{SigmaRange, SigmaSchedule, TerminalAlphaBar};
    let engine = Engine::open("demo", None, &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
    let ramp = |spacing, sigma_range| Request {
        steps: 10,
        spacing,
        sigmas: SigmaSchedule::Karras,
        sigma_range,
        ..Request::new("solid black background")
    };
    let below_t = engine.job(ramp(TimestepSpacing::Leading, SigmaRange::Spacing)).unwrap();
    assert!(
        below_t.zero_snr && below_t.warnings.is_empty(),
        "{:?}",
        below_t.warnings
    );
    assert_eq!(below_t.request.terminal_alpha_bar, TerminalAlphaBar::Exact);
    let from_t = engine
        .job(ramp(TimestepSpacing::Trailing, SigmaRange::Spacing))
        .unwrap();
    assert_eq!(from_t.request.terminal_alpha_bar, TerminalAlphaBar::Comfy);
    let warning = from_t.warnings[0].render(Words::Flags);
    assert!(
        warning.contains("--sigmas karras needs a finite sigma_max") && warning.contains("--terminal-alpha-bar comfy"),
        "{warning}"
    );
}

/// A `.pt` whose pickle nests 100,000 tuples (found by tests/fuzz_readers.rs, which holds the other
/// hostile files it found): candle's reader dropped them recursively and the process died of a
/// stack overflow. The pickle check now refuses objects nested deeper than tensor checkpoints go.
#[test]
fn a_deeply_nested_pickle_is_refused_in_one_line() {
    let model = fixture("fuzz/ckpt/regressions/stack-overflow-nested-tuples.pt");
    let dir = tempfile::tempdir().unwrap();
    let out = sdfix(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "x",
        "--out-dir",
        dir.path().to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(model.to_str().unwrap()) && stderr.contains("nested more than 64 deep"),
        "{stderr}"
    );
}
