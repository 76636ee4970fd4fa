//! Mutations of a safetensors file through its header: offsets, shapes and dtypes set to
//! boundary values, overlapping or duplicated tensors, re-laid-out files that stay valid with
//! hostile shapes, deep or non-UTF-8 JSON, a header length that lies; and LoRA key renames.

use rand::Rng;
use serde_json::{json, Map, Value};

use super::bytes::{havoc, interesting};
use super::{pick, Rand, Seed};

const METADATA: &str = "__metadata__";
/// The largest tensor a valid re-layout makes, in elements (inputs stay small).
const RELAYOUT_MAX_ELEMENTS: u64 = 1 << 16;

const DTYPES: &[&str] = &[
    "F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL", "F8_E4M3", "F8_E5M2",
    "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64", "f32", "",
];

/// A parsed file: its header's entries and the bytes after the header.
struct File {
    header: Map<String, Value>,
    data: Vec<u8>,
}

fn parse(bytes: &[u8]) -> Option<File> {
    let length = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    let header = bytes.get(8..8usize.checked_add(length)?)?;
    match serde_json::from_slice(header).ok()? {
        Value::Object(header) => Some(File {
            header,
            data: bytes[8 + length..].to_vec(),
        }),
        _ => None,
    }
}

fn element_bytes(dtype: &str) -> u64 {
    match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        _ => 1,
    }
}

/// A new input from `seeds[index]`: mostly through its header, sometimes byte havoc on top.
pub fn mutate(rng: &mut Rand, index: usize, seeds: &[Seed]) -> Vec<u8> {
    mutate_with(rng, index, seeds, |_, _| {})
}

/// [`mutate`] with LoRA key renames among the header mutations.
pub fn mutate_lora(rng: &mut Rand, index: usize, seeds: &[Seed]) -> Vec<u8> {
    mutate_with(rng, index, seeds, rename_lora_key)
}

fn mutate_with(rng: &mut Rand, index: usize, seeds: &[Seed], extra: fn(&mut Rand, &mut File)) -> Vec<u8> {
    let seed = &seeds[index].bytes;
    let mut bytes = match parse(seed) {
        Some(mut file) if rng.random_bool(0.8) => {
            for _ in 0..rng.random_range(1..=3) {
                if rng.random_bool(0.3) {
                    extra(rng, &mut file);
                } else {
                    mutate_header(rng, &mut file);
                }
            }
            write(rng, file)
        }
        _ => seed.clone(),
    };
    if bytes == *seed || rng.random_bool(0.15) {
        havoc(rng, &mut bytes, seeds);
    }
    bytes
}

fn tensor_names(file: &File) -> Vec<String> {
    file.header.keys().filter(|k| *k != METADATA).cloned().collect()
}

/// A JSON value a numeric field should not have, or a boundary number.
fn odd_number(rng: &mut Rand, near: u64) -> Value {
    match rng.random_range(0..10) {
        0 => json!(-1),
        1 => json!(1.5),
        2 => json!(1e300),
        3 => json!("8"),
        4 => Value::Null,
        _ => json!(interesting(rng, near)),
    }
}

fn mutate_header(rng: &mut Rand, file: &mut File) {
    let names = tensor_names(file);
    let data_len = file.data.len() as u64;
    if names.is_empty() || rng.random_bool(0.1) {
        mutate_metadata(rng, file);
        return;
    }
    let name = pick(rng, &names).clone();
    let other = pick(rng, &names).clone();
    let other_entry = file.header[&other].clone();
    let Some(entry) = file.header.get_mut(&name).and_then(Value::as_object_mut) else {
        return;
    };
    match rng.random_range(0..12) {
        0 => {
            let offsets = [odd_number(rng, data_len), odd_number(rng, data_len)];
            entry.insert("data_offsets".into(), json!(offsets));
        }
        1 => {
            // Another tensor's bytes (overlap), or this one's reversed.
            let offsets = match rng.random_bool(0.5) {
                true => other_entry["data_offsets"].clone(),
                false => {
                    let offsets = entry.get("data_offsets").and_then(Value::as_array);
                    let mut reversed = offsets.cloned().unwrap_or_default();
                    reversed.reverse();
                    Value::Array(reversed)
                }
            };
            entry.insert("data_offsets".into(), offsets);
        }
        2 => {
            let rank = rng.random_range(0..=6);
            let shape: Vec<Value> = (0..rank).map(|_| odd_number(rng, 4)).collect();
            entry.insert("shape".into(), json!(shape));
        }
        3 => {
            // The same element count in another shape (valid: reaches what reads the shape).
            let dims = entry.get("shape").and_then(Value::as_array);
            let count = dims.map_or(1, |d| d.iter().filter_map(Value::as_u64).fold(1u64, u64::wrapping_mul));
            let shape = match rng.random_range(0..3) {
                0 => json!([count]),
                1 => json!([1, count, 1]),
                _ => json!([count, 1]),
            };
            entry.insert("shape".into(), shape);
        }
        4 => {
            let dtype = json!(*pick(rng, DTYPES));
            entry.insert("dtype".into(), dtype);
        }
        5 => {
            let field = *pick(rng, &["dtype", "shape", "data_offsets"]);
            entry.remove(field);
            if rng.random_bool(0.3) {
                entry.insert("extra".into(), json!(1));
            }
        }
        6 => {
            let copy = file.header[&name].clone();
            let new_name = odd_name(rng, &name);
            file.header.insert(new_name, copy);
        }
        7 => {
            let value = file.header.remove(&name).unwrap_or(Value::Null);
            if rng.random_bool(0.5) {
                file.header.insert(odd_name(rng, &name), value);
            }
        }
        8 => {
            let value = pick(rng, &[json!([]), json!(1), json!("x"), Value::Null, json!({})]).clone();
            file.header.insert(name, value);
        }
        _ => relayout(rng, file, &name),
    }
}

/// A name a writer would not give: empty, huge, the metadata key, control characters.
fn odd_name(rng: &mut Rand, name: &str) -> String {
    match rng.random_range(0..7) {
        0 => String::new(),
        1 => METADATA.into(),
        2 => "x".repeat(rng.random_range(1000..20_000)),
        3 => format!("{name}\u{0}\u{202e}"),
        4 => format!("{name}\n\u{1b}[2J"),
        5 => format!("{name}.copy"),
        _ => name.to_uppercase(),
    }
}

fn mutate_metadata(rng: &mut Rand, file: &mut File) {
    let value = match rng.random_range(0..6) {
        0 => json!({"format": 1}),
        1 => json!(["pt"]),
        2 => json!("pt"),
        3 => json!({"modelspec.title": "x".repeat(rng.random_range(1..100_000))}),
        4 => json!({"a": {"b": "c"}}),
        _ => {
            file.header.remove(METADATA);
            return;
        }
    };
    file.header.insert(METADATA.into(), value);
}

/// A valid file again after giving `name` a new shape and dtype: every tensor's offsets re-laid
/// out in order, the data rebuilt (old bytes where they were, pattern bytes for new room).
fn relayout(rng: &mut Rand, file: &mut File, name: &str) {
    let rank = rng.random_range(0..=4);
    let mut shape = Vec::new();
    let mut count = 1u64;
    for _ in 0..rank {
        let dim = match rng.random_range(0..4) {
            0 => 0,
            1 => 1,
            2 => rng.random_range(2..=64),
            _ => rng.random_range(2..=RELAYOUT_MAX_ELEMENTS),
        };
        if count.saturating_mul(dim.max(1)) > RELAYOUT_MAX_ELEMENTS {
            break;
        }
        count *= dim;
        shape.push(dim);
    }
    if let Some(entry) = file.header.get_mut(name).and_then(Value::as_object_mut) {
        entry.insert("shape".into(), json!(shape));
        if rng.random_bool(0.3) {
            let dtype = *pick(rng, &DTYPES[..13]);
            entry.insert("dtype".into(), json!(dtype));
        }
    }
    let mut data = Vec::new();
    for tensor in tensor_names(file) {
        let Some(entry) = file.header.get_mut(&tensor).and_then(Value::as_object_mut) else {
            continue;
        };
        let dims: Option<Vec<u64>> = entry
            .get("shape")
            .and_then(Value::as_array)
            .map(|d| d.iter().filter_map(Value::as_u64).collect());
        let dtype = entry.get("dtype").and_then(Value::as_str).unwrap_or("U8");
        // Shapes an earlier mutation made huge get no bytes (the file is then invalid, as wanted).
        let bytes = dims
            .and_then(|d| d.iter().try_fold(element_bytes(dtype), |n, &dim| n.checked_mul(dim)))
            .filter(|&n| n <= RELAYOUT_MAX_ELEMENTS * 8)
            .unwrap_or(0);
        let begin = entry
            .get("data_offsets")
            .and_then(|o| o.get(0))
            .and_then(Value::as_u64)
            .unwrap_or(0) as usize;
        let start = data.len();
        for i in 0..bytes as usize {
            data.push(
                file.data
                    .get(begin.saturating_add(i))
                    .copied()
                    .unwrap_or((i * 37) as u8),
            );
        }
        entry.insert("data_offsets".into(), json!([start, data.len()]));
    }
    file.data = data;
}

/// kohya and PEFT key edits: a part renamed, its partner gone, up and down swapped.
fn rename_lora_key(rng: &mut Rand, file: &mut File) {
    const SUFFIXES: &[&str] = &[
        ".lora_down.weight",
        ".lora_up.weight",
        ".lora_A.weight",
        ".lora_B.weight",
        ".alpha",
        ".weight",
        "",
    ];
    const PREFIXES: &[&str] = &["lora_unet_", "lora_te_", "unet.", "text_encoder.", "lora_te1_", ""];
    let names = tensor_names(file);
    if names.is_empty() {
        return;
    }
    let name = pick(rng, &names).clone();
    let Some(value) = file.header.remove(&name) else {
        return;
    };
    let suffix = SUFFIXES
        .iter()
        .find(|s| !s.is_empty() && name.ends_with(*s))
        .copied()
        .unwrap_or("");
    let stem = &name[..name.len() - suffix.len()];
    let renamed = match rng.random_range(0..4) {
        0 => format!("{stem}{}", pick(rng, SUFFIXES)),
        1 => {
            let bare = PREFIXES
                .iter()
                .find_map(|p| stem.strip_prefix(p).filter(|_| !p.is_empty()))
                .unwrap_or(stem);
            format!("{}{bare}{suffix}", pick(rng, PREFIXES))
        }
        2 => return, // the partner gone
        _ => {
            // Up and down swapped.
            let partner = [
                (".lora_down.weight", ".lora_up.weight"),
                (".lora_A.weight", ".lora_B.weight"),
            ]
            .iter()
            .find_map(|(a, b)| (suffix == *a).then_some(*b).or((suffix == *b).then_some(*a)));
            let Some(partner) = partner else {
                file.header.insert(name, value);
                return;
            };
            let other = format!("{stem}{partner}");
            if let Some(other_value) = file.header.insert(other, value) {
                file.header.insert(name, other_value);
            }
            return;
        }
    };
    file.header.insert(renamed, value);
}

/// The file's bytes: the header serialised (sometimes with text edits JSON values cannot
/// express), a length field that is usually right, and the data.
fn write(rng: &mut Rand, file: File) -> Vec<u8> {
    let mut header = serde_json::to_vec(&Value::Object(file.header)).unwrap();
    match rng.random_range(0..12) {
        0 => {
            // Nesting deeper than any parser's limit, as a tensor's value.
            let depth = *pick(rng, &[64usize, 200, 10_000, 200_000]);
            let (open, close) = if rng.random_bool(0.5) {
                ("[", "]")
            } else {
                ("{\"a\":", "}")
            };
            let deep = format!("\"deep\":{}1{},", open.repeat(depth), close.repeat(depth));
            header.splice(1..1, deep.into_bytes());
        }
        1 if header.len() > 2 => {
            // A duplicate key: the first entry's text again.
            let end = header.iter().position(|&b| b == b'}').unwrap_or(1);
            let entry = header[1..=end.min(header.len() - 1)].to_vec();
            header.splice(1..1, entry.into_iter().chain([b',']));
        }
        2 if !header.is_empty() => {
            // Bytes that are not UTF-8, inside the JSON.
            let at = rng.random_range(0..header.len());
            header.insert(at, *pick(rng, &[0xff, 0xc0, 0x80, 0xed]));
        }
        3 => header.extend(std::iter::repeat_n(*pick(rng, &[b' ', 0]), rng.random_range(1..16))),
        _ => {}
    }
    let length = match rng.random_range(0..10) {
        0 => interesting(rng, header.len() as u64),
        1 => (header.len() + file.data.len()) as u64,
        _ => header.len() as u64,
    };
    let mut bytes = length.to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    let data_len = match rng.random_range(0..10) {
        0 => rng.random_range(0..=file.data.len()),
        _ => file.data.len(),
    };
    bytes.extend_from_slice(&file.data[..data_len]);
    if rng.random_bool(0.05) {
        bytes.extend(std::iter::repeat_n(0u8, rng.random_range(1..4096)));
    }
    bytes
}
