//! Mutations that know nothing of the format: bit flips, boundary integers, cuts, copies and
//! splices with another seed (AFL's havoc stage, in small).

use rand::Rng;

use super::{pick, Rand, Seed};

/// Integers at the edges of the widths a header field can have.
pub const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    3,
    7,
    8,
    16,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0x8000,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    1 << 53,
    i64::MAX as u64,
    1 << 63,
    u64::MAX,
];

/// A boundary integer, or one near `near` (a length the input already has).
pub fn interesting(rng: &mut Rand, near: u64) -> u64 {
    match rng.random_range(0..4) {
        0 => near.wrapping_add(rng.random_range(0..3)).wrapping_sub(1),
        1 => rng.random(),
        _ => *pick(rng, INTERESTING),
    }
}

/// One to four havoc mutations of `bytes`; `others` are spliced from.
pub fn havoc(rng: &mut Rand, bytes: &mut Vec<u8>, others: &[Seed]) {
    for _ in 0..rng.random_range(1..=4) {
        mutate_once(rng, bytes, others);
    }
}

fn position(rng: &mut Rand, bytes: &[u8]) -> usize {
    rng.random_range(0..=bytes.len())
}

fn mutate_once(rng: &mut Rand, bytes: &mut Vec<u8>, others: &[Seed]) {
    let len = bytes.len();
    match rng.random_range(0..10) {
        0 if len > 0 => {
            let at = rng.random_range(0..len);
            bytes[at] ^= 1 << rng.random_range(0..8);
        }
        1 if len > 0 => {
            let at = rng.random_range(0..len);
            bytes[at] = rng.random();
        }
        2 if len > 0 => {
            let at = rng.random_range(0..len);
            bytes[at] = bytes[at].wrapping_add(rng.random_range(1..=16)).wrapping_sub(8);
        }
        3 => {
            // A boundary integer, 1 to 8 bytes, little- or big-endian.
            let width = *pick(rng, &[1usize, 2, 4, 8]);
            let value = interesting(rng, len as u64);
            let mut field = value.to_le_bytes()[..width].to_vec();
            if rng.random_bool(0.25) {
                field.reverse();
            }
            let at = position(rng, bytes).min(len.saturating_sub(width));
            let end = (at + width).min(len);
            bytes.splice(at..end, field);
        }
        4 if len > 0 => {
            let at = rng.random_range(0..len);
            let most = *pick(rng, &[8usize, 64, 4096]);
            let cut = rng.random_range(1..=(len - at).min(most));
            bytes.drain(at..at + cut);
        }
        5 => {
            let at = position(rng, bytes);
            let count = rng.random_range(1..=64);
            let inserted: Vec<u8> = (0..count).map(|_| rng.random()).collect();
            bytes.splice(at..at, inserted);
        }
        6 if len > 0 => {
            // A copy of a piece elsewhere.
            let from = rng.random_range(0..len);
            let count = rng.random_range(1..=(len - from).min(256));
            let piece = bytes[from..from + count].to_vec();
            let at = position(rng, bytes);
            bytes.splice(at..at, piece);
        }
        7 => bytes.truncate(position(rng, bytes)),
        8 if !others.is_empty() => {
            // This input's head and another seed's tail.
            let other = &pick(rng, others).bytes;
            let at = position(rng, bytes);
            let from = rng.random_range(0..=other.len());
            bytes.truncate(at);
            bytes.extend_from_slice(&other[from..]);
        }
        _ => {
            let count = rng.random_range(1..=32);
            let byte = *pick(rng, &[0u8, 0xff, b' ', b'{', b'[', b'"', b'\n']);
            bytes.extend(std::iter::repeat_n(byte, count));
        }
    }
}
