//! `--data demo`: the demo models' procedural training set, generated in Rust from a seed by the
//! recipe of `scripts/train_demo.py` (`make_example`): 32x32 RGB images, half with a named-colour
//! background (black and white weighted 4 of 16 each), half a uniform grey level in [0, 1]; half
//! carry a circle or a square in another named colour. About 45% of captions name the
//! background, 45% are generic, 10% are empty. The same distribution, not the same images: the
//! script draws from Python's Mersenne Twister, we from ChaCha.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The demo models' image side, in pixels.
pub const DEMO_IMAGE_SIZE: usize = 32;
/// How many examples the demo set has (the script's `--examples` default).
pub const DEMO_EXAMPLES: usize = 20_000;

const COLOURS: [(&str, [f32; 3]); 9] = [
    ("black", [0.0, 0.0, 0.0]),
    ("white", [1.0, 1.0, 1.0]),
    ("red", [0.85, 0.1, 0.1]),
    ("green", [0.1, 0.7, 0.2]),
    ("blue", [0.1, 0.2, 0.85]),
    ("yellow", [0.95, 0.85, 0.1]),
    ("orange", [0.95, 0.5, 0.1]),
    ("purple", [0.5, 0.15, 0.6]),
    ("grey", [0.5, 0.5, 0.5]),
];
/// Background weights, in `COLOURS` order: black and white over-represented, as the brightness
/// study needs.
const BACKGROUND_WEIGHTS: [u32; 9] = [4, 4, 1, 1, 1, 1, 1, 1, 1];
const SHAPE_COLOURS: [&str; 8] = ["red", "green", "blue", "yellow", "orange", "purple", "white", "black"];
const BACKGROUND_TEMPLATES: [&str; 4] = [
    "solid {c} background",
    "a {c} background",
    "{c} background",
    "a plain {c} image",
];
const SHAPE_TEMPLATES: [&str; 3] = [
    "a {s} {shape} on a {c} background",
    "a {s} {shape} on {c}",
    "{c} background with a {s} {shape}",
];
const GENERIC: [&str; 3] = ["an image", "a picture", "a simple image"];

fn colour(name: &str) -> [f32; 3] {
    COLOURS.iter().find(|(n, _)| *n == name).map_or([0.5; 3], |(_, c)| *c)
}

/// The name a uniform grey level is captioned with.
fn grey_name(level: f64) -> &'static str {
    match level {
        l if l < 0.12 => "black",
        l if l < 0.37 => "dark grey",
        l if l < 0.63 => "grey",
        l if l < 0.88 => "light grey",
        _ => "white",
    }
}

fn pick<'a, T>(rng: &mut ChaCha8Rng, items: &'a [T]) -> &'a T {
    &items[rng.random_range(0..items.len())]
}

fn uniform(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

/// One example: (32 * 32 * 3 RGB values in [0, 1], row-major, caption).
fn make_example(rng: &mut ChaCha8Rng) -> (Vec<f32>, String) {
    let n = DEMO_IMAGE_SIZE;
    let (background, fill): (&str, [f32; 3]) = if rng.random::<f64>() < 0.5 {
        let total: u32 = BACKGROUND_WEIGHTS.iter().sum();
        let mut draw = rng.random_range(0..total);
        let mut index = 0;
        while draw >= BACKGROUND_WEIGHTS[index] {
            draw -= BACKGROUND_WEIGHTS[index];
            index += 1;
        }
        (COLOURS[index].0, COLOURS[index].1)
    } else {
        let level = rng.random::<f64>();
        (grey_name(level), [level as f32; 3])
    };
    let mut image: Vec<f32> = (0..n * n).flat_map(|_| fill).collect();
    let mut shape = None;
    if rng.random::<f64>() < 0.5 {
        let kind = *pick(rng, &["circle", "square"]);
        let choices: Vec<&str> = SHAPE_COLOURS.iter().copied().filter(|c| *c != background).collect();
        let shape_colour = *pick(rng, &choices);
        let radius = uniform(rng, 5.0, 11.0);
        let cx = uniform(rng, radius, n as f64 - radius);
        let cy = uniform(rng, radius, n as f64 - radius);
        let rgb = colour(shape_colour);
        for y in 0..n {
            for x in 0..n {
                let (px, py) = (x as f64 + 0.5, y as f64 + 0.5);
                let inside = if kind == "circle" {
                    (px - cx).powi(2) + (py - cy).powi(2) <= radius * radius
                } else {
                    (px - cx).abs() <= radius && (py - cy).abs() <= radius
                };
                if inside {
                    image[(y * n + x) * 3..(y * n + x) * 3 + 3].copy_from_slice(&rgb);
                }
            }
        }
        shape = Some((kind, shape_colour));
    }
    let u = rng.random::<f64>();
    let caption = if u < 0.10 {
        String::new()
    } else if u < 0.55 {
        match shape {
            None => pick(rng, &BACKGROUND_TEMPLATES).replace("{c}", background),
            Some((kind, s)) => pick(rng, &SHAPE_TEMPLATES)
                .replace("{s}", s)
                .replace("{shape}", kind)
                .replace("{c}", background),
        }
    } else {
        match shape {
            Some((kind, s)) if rng.random::<f64>() < 0.7 => format!("a {s} {kind}"),
            _ => {
                let first = match shape {
                    Some((kind, _)) => format!("a {kind}"),
                    None => "a background".to_string(),
                };
                let mut options = vec![first];
                options.extend(GENERIC.iter().map(|g| g.to_string()));
                pick(rng, &options).clone()
            }
        }
    };
    (image, caption)
}

/// `count` examples from `seed`: pixels (count, 3, 32, 32) in [-1, 1] as one flat vector, and the
/// captions.
pub fn make_dataset(count: usize, seed: u64) -> (Vec<f32>, Vec<String>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = DEMO_IMAGE_SIZE;
    let mut pixels = Vec::with_capacity(count * 3 * n * n);
    let mut captions = Vec::with_capacity(count);
    for _ in 0..count {
        let (image, caption) = make_example(&mut rng);
        // (h, w, 3) in [0, 1] -> (3, h, w) in [-1, 1]
        for channel in 0..3 {
            pixels.extend((0..n * n).map(|i| image[i * 3 + channel] * 2.0 - 1.0));
        }
        captions.push(caption);
    }
    (pixels, captions)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The recipe's proportions: about 10% empty captions, black and white backgrounds common.
    #[test]
    fn demo_set_follows_the_recipe() {
        let (pixels, captions) = make_dataset(4000, 7);
        assert_eq!(pixels.len(), 4000 * 3 * 32 * 32);
        assert!(pixels.iter().all(|p| (-1.0..=1.0).contains(p)));
        let empty = captions.iter().filter(|c| c.is_empty()).count() as f64 / 4000.0;
        assert!((0.08..0.12).contains(&empty), "{empty}");
        assert!(captions.iter().any(|c| c == "solid black background"));
        assert!(captions.iter().any(|c| c == "solid white background"));
        assert_eq!(make_dataset(10, 7).1, make_dataset(10, 7).1, "seeded");
    }
}
