//! SDXL end to end on the tiny random SDXL (tests/fixtures/tiny-sdxl: two text encoders of
//! different widths, `text_time` UNet, 0.13025 VAE), against diffusers' SDXL pipelines given the
//! same initial latents (tests/fixtures/refs/sdxl.*, from `scripts/make_sdxl_refs.py`).

mod common;

const REGENERATE: &str = "regenerate with: python scripts/make_sdxl_refs.py";
/// The bars: final latents within 2e-3 max abs, PNG within 2/255.
const TOLERANCES: (f32, u8) = (2e-3, 2);

fn assert_case(name: &str) {
    common::assert_reference_case("sdxl", name, TOLERANCES, REGENERATE);
}

#[test]
fn vpred_zero_snr_trailing_ddim_with_rescale_matches_diffusers() {
    assert_case("vpred_zsnr_ddim");
}

#[test]
fn euler_matches_diffusers() {
    assert_case("euler");
}

#[test]
fn an_empty_negative_prompt_is_zeros_as_in_diffusers() {
    assert_case("empty_negative_zeroed");
}

#[test]
fn an_empty_negative_prompt_can_be_encoded() {
    assert_case("empty_negative_encoded");
}

#[test]
fn stock_epsilon_leading_matches_diffusers() {
    assert_case("stock_epsilon_leading");
}

#[test]
fn micro_conditioning_other_than_the_defaults_matches_diffusers() {
    assert_case("micro_conditioning");
}

#[test]
fn without_cfg_matches_diffusers() {
    assert_case("no_cfg");
}

#[test]
fn img2img_matches_diffusers() {
    assert_case("img2img_s06");
}

#[test]
fn inpainting_with_the_plain_unet_matches_diffusers() {
    assert_case("inpaint_s075");
}

#[test]
fn inpainting_with_a_9_channel_unet_matches_diffusers() {
    assert_case("inpaint9_s1");
}

/// The micro-conditioning flags reach the UNet: the same case without them lands elsewhere.
#[test]
fn micro_conditioning_changes_the_picture() {
    let refs = common::reference_tensors("sdxl");
    let args = common::reference_case_args("sdxl", "micro_conditioning");
    // The six flags and their values follow --original-size.
    let cut = args.iter().position(|a| a == "--original-size").unwrap();
    let mut plain: Vec<String> = vec!["--seed".into(), "0".into()];
    plain.extend(args[..cut].iter().cloned());
    plain.extend(args[cut + 12..].iter().cloned());
    let (latents, _) = common::generate_from_latents(&refs["micro_conditioning.initial"], &plain);
    let gap = common::max_abs_diff(&latents[0], &refs["micro_conditioning.final"].get(0).unwrap());
    assert!(gap > 1e-2, "micro-conditioning made no difference ({gap:e})");
}

#[test]
fn micro_conditioning_is_refused_where_it_cannot_apply() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let sd = common::fixture("tiny-sd");
    let sdxl = common::fixture("tiny-sdxl");
    let cases: [(&std::path::Path, &[&str], &str); 3] = [
        (
            &sd,
            &["--original-size", "64x64"],
            "--original-size applies to SDXL models only",
        ),
        (
            &sdxl,
            &["--negative-target-size", "64x64"],
            "--negative-target-size needs --negative-original-size",
        ),
        (&sdxl, &["--crop-top-left", "3"], "not a corner"),
    ];
    for (model, flags, needle) in cases {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "x",
            "--steps",
            "2",
            "--out-dir",
            out,
        ];
        args.extend_from_slice(flags);
        let result = common::sdfix(&args);
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(!result.status.success(), "{flags:?} was accepted");
        assert!(stderr.contains(needle), "{flags:?}: {stderr}");
        assert!(common::pngs(dir.path()).is_empty());
    }
}
