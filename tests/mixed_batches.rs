//! The batching invariant: whatever a prompt file mixes (text to image, img2img, inpainting,
//! samplers, strengths, sizes, seeds), every line's PNGs are byte-identical at `--batch-size 1`
//! and `--batch-size 4`, in any line order. A property test over random prompt files on the demo
//! model (a 4-channel UNet: text, img2img and blended inpainting), and a fixed one on the
//! 9-channel inpainting fixture. Black-box: the binary. The server's side is in tests/serve.rs.

mod common;

use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// One random prompt-file line.
#[derive(Debug, Clone)]
struct Line {
    prompt: &'static str,
    /// 0 text, 1 img2img, 2 inpainting.
    mode: u8,
    picture: &'static str,
    strength: f64,
    sampler: &'static str,
    steps: u8,
    seed: u16,
    size: Option<(u16, u16)>,
    guidance: f64,
    vae_encode: &'static str,
    num_images: u8,
}

impl Line {
    fn json(&self) -> String {
        let mut object = serde_json::json!({
            "prompt": self.prompt, "sampler": self.sampler, "steps": self.steps, "seed": self.seed,
            "guidance": self.guidance, "num_images": self.num_images,
        });
        if let Some((w, h)) = self.size {
            object["width"] = w.into();
            object["height"] = h.into();
        }
        if self.mode > 0 {
            object["init_image"] = self.picture.into();
            object["strength"] = self.strength.into();
            object["vae_encode"] = self.vae_encode.into();
        }
        if self.mode == 2 {
            object["mask"] = "mask.png".into();
        }
        object.to_string()
    }
}

fn line() -> impl Strategy<Value = Line> {
    (
        (
            prop::sample::select(vec!["solid black background", "solid white background", "a red circle"]),
            0u8..3,
            prop::sample::select(vec!["grey.png", "ramp.png"]),
            prop::sample::select(vec![0.5, 0.75, 1.0]),
            prop::sample::select(vec!["ddim", "euler", "euler_a", "dpmpp_2m", "unipc"]),
            3u8..5,
        ),
        (
            0u16..4,
            prop::sample::select(vec![None, Some((32, 32)), Some((48, 32))]),
            prop::sample::select(vec![1.0, 7.5]),
            prop::sample::select(vec!["sample", "mean"]),
            1u8..3,
        ),
    )
        .prop_map(
            |((prompt, mode, picture, strength, sampler, steps), (seed, size, guidance, vae_encode, num_images))| {
                Line {
                    prompt,
                    mode,
                    picture,
                    strength,
                    sampler,
                    steps,
                    seed,
                    size,
                    guidance,
                    vae_encode,
                    num_images,
                }
            },
        )
}

/// `lines` at batch 1 in file order, then at batch 4 in `order`: equal PNGs line by line.
fn check(dir: &Path, model: &str, lines: &[String], order: &[usize]) -> Result<(), TestCaseError> {
    let alone = common::run_prompt_lines(dir, model, lines, 1, &[]);
    let shuffled: Vec<String> = order.iter().map(|&i| lines[i].clone()).collect();
    let batched = common::run_prompt_lines(dir, model, &shuffled, 4, &[]);
    for line in lines {
        prop_assert!(batched[line] == alone[line], "{} differs at --batch-size 4", line);
    }
    Ok(())
}

#[test]
fn any_prompt_file_gives_the_same_pngs_at_batch_size_1_and_4_in_any_order() {
    let dir = tempfile::tempdir().unwrap();
    common::write_pictures(dir.path());
    // Few cases: each is two runs of the binary (seconds); the strategy spreads them over modes.
    let mut runner = TestRunner::new(Config {
        cases: 6,
        failure_persistence: None,
        ..Config::default()
    });
    let files = prop::collection::vec(line(), 4..9).prop_flat_map(|lines| {
        let n = lines.len();
        (Just(lines), Just((0..n).collect::<Vec<_>>()).prop_shuffle())
    });
    runner
        .run(&files, |(lines, order)| {
            let lines: Vec<String> = lines.iter().map(Line::json).collect();
            check(dir.path(), "demo", &lines, &order)
        })
        .unwrap();
}

/// An inpainting UNet (mask and masked picture as extra channels): strengths and samplers
/// mixed in one file.
#[test]
fn an_inpainting_model_batches_its_lines_without_changing_them() {
    let dir = tempfile::tempdir().unwrap();
    common::write_pictures(dir.path());
    let model = common::fixture("tiny-sd-inpaint");
    let lines: Vec<String> = [
        (1.0, "ddim", 1),
        (0.75, "ddim", 2),
        (1.0, "euler", 3),
        (0.5, "ddim", 4),
        (0.75, "ddim", 5),
    ]
    .iter()
    .map(|(strength, sampler, seed)| {
        serde_json::json!({
            "prompt": "a red circle", "init_image": "ramp.png", "mask": "mask.png", "strength": strength,
            "sampler": sampler, "seed": seed, "steps": 4, "width": 16, "height": 16,
        })
        .to_string()
    })
    .collect();
    check(dir.path(), model.to_str().unwrap(), &lines, &[4, 2, 0, 3, 1]).unwrap();
}
