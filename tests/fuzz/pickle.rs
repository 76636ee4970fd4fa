//! Mutations of a PyTorch zip checkpoint: its `data.pkl` split into opcodes and edited as a
//! program (boundary arguments, lengths that lie, other globals, bad memo indices, deep nesting,
//! memo copy bombs, unknown opcodes), its storages cut or renamed, the zip rewritten, and then
//! sometimes its local and central headers' size and offset fields set to boundary values.

use std::io::{Cursor, Read, Write};

use rand::Rng;

use super::bytes::{havoc, interesting};
use super::{pick, Rand, Seed};

/// How an opcode's argument is laid out (pickletools' table, protocols 0 to 5).
enum Arg {
    None,
    Fixed(usize),
    /// Text up to a newline, `lines` times.
    Lines(usize),
    /// A little-endian length of this many bytes, then that many bytes.
    Counted(usize),
}

fn arg_of(code: u8) -> Arg {
    match code {
        0x80 | b'K' | b'h' | b'q' | 0x82 => Arg::Fixed(1),
        b'M' | 0x83 => Arg::Fixed(2),
        b'J' | b'j' | b'r' | 0x84 => Arg::Fixed(4),
        b'G' | 0x95 => Arg::Fixed(8),
        b'c' | b'i' => Arg::Lines(2),
        b'I' | b'L' | b'S' | b'V' | b'F' | b'p' | b'g' | b'P' => Arg::Lines(1),
        b'U' | b'C' | 0x8c | 0x8a => Arg::Counted(1),
        b'X' | b'T' | b'B' | 0x8b => Arg::Counted(4),
        0x8d | 0x8e | 0x96 => Arg::Counted(8),
        _ => Arg::None,
    }
}

/// One opcode and its argument bytes as they are in the program (lengths included).
#[derive(Clone)]
struct Op {
    code: u8,
    arg: Vec<u8>,
}

fn op(code: u8, arg: &[u8]) -> Op {
    Op {
        code,
        arg: arg.to_vec(),
    }
}

/// The program's opcodes, or `None` where it does not split (a length past its end).
fn split(program: &[u8]) -> Option<Vec<Op>> {
    let mut ops = Vec::new();
    let mut at = 0;
    while at < program.len() {
        let code = program[at];
        let start = at + 1;
        let end = match arg_of(code) {
            Arg::None => start,
            Arg::Fixed(n) => start + n,
            Arg::Lines(lines) => {
                let mut end = start;
                for _ in 0..lines {
                    end += program.get(end..)?.iter().position(|&b| b == b'\n')? + 1;
                }
                end
            }
            Arg::Counted(width) => {
                let mut length = [0u8; 8];
                length[..width].copy_from_slice(program.get(start..start + width)?);
                start + width + usize::try_from(u64::from_le_bytes(length)).ok()?
            }
        };
        ops.push(Op {
            code,
            arg: program.get(start..end)?.to_vec(),
        });
        at = end;
    }
    Some(ops)
}

fn join(ops: &[Op]) -> Vec<u8> {
    ops.iter()
        .flat_map(|op| std::iter::once(op.code).chain(op.arg.iter().copied()))
        .collect()
}

/// Globals to put in a program: those a tensor index uses, those that run code, those candle's
/// reader treats specially, and nonsense.
const GLOBALS: &[&str] = &[
    "torch._utils\n_rebuild_tensor_v2\n",
    "torch._utils\n_rebuild_parameter\n",
    "collections\nOrderedDict\n",
    "torch\nHalfStorage\n",
    "torch\nFloatStorage\n",
    "torch\nIntStorage\n",
    "torch\nBoolStorage\n",
    "numpy.core.multiarray\nscalar\n",
    "_codecs\nencode\n",
    "os\nsystem\n",
    "builtins\neval\n",
    "subprocess\nPopen\n",
    "torch._tensor\n_rebuild_from_type_v2\n",
    "__torch__\nModule\n",
    "collections\ndefaultdict\n",
    "\n\n",
    "torch._utils\n",
];

/// Every opcode byte a pickle can hold, and some it cannot.
const CODES: &[u8] = b"(.012FIJKLMNPQRSTUVXabcdeghijlopqrstu}]) \x80\x81\x82\x83\x84\x85\x86\x87\x88\x89\x8a\x8b\x8c\x8d\x8e\x8f\x90\x91\x92\x93\x94\x95\x96\x97\x98\xff\x00";

/// An opcode with an argument of the right layout, its lengths sometimes lying.
fn random_op(rng: &mut Rand) -> Op {
    let code = *pick(rng, CODES);
    let arg = match arg_of(code) {
        Arg::None => Vec::new(),
        Arg::Fixed(n) => interesting(rng, 0).to_le_bytes()[..n].to_vec(),
        Arg::Lines(1) => b"0\n".to_vec(),
        Arg::Lines(_) => pick(rng, GLOBALS).as_bytes().to_vec(),
        Arg::Counted(width) => {
            let payload: Vec<u8> = (0..rng.random_range(0..16)).map(|_| rng.random()).collect();
            let length = if rng.random_bool(0.7) {
                payload.len() as u64
            } else {
                interesting(rng, payload.len() as u64)
            };
            let mut arg = length.to_le_bytes()[..width].to_vec();
            arg.extend(payload);
            arg
        }
    };
    Op { code, arg }
}

fn with_length(width: usize, payload: &[u8]) -> Vec<u8> {
    let mut arg = (payload.len() as u64).to_le_bytes()[..width].to_vec();
    arg.extend_from_slice(payload);
    arg
}

/// A pattern repeated to nest or pile objects deeper than any tensor index does.
fn deep(rng: &mut Rand) -> Vec<Op> {
    let n = *pick(rng, &[100usize, 1000, 10_000, 100_000]);
    match rng.random_range(0..4) {
        0 => vec![op(b'(', &[]); n],
        1 => std::iter::once(op(b')', &[]))
            .chain(std::iter::repeat_n(op(0x85, &[]), n))
            .collect(),
        2 => std::iter::repeat_n(op(b']', &[]), n)
            .chain(std::iter::repeat_n(op(b'a', &[]), n - 1))
            .collect(),
        _ => std::iter::repeat_n(op(b'}', &[]), n).collect(),
    }
}

/// Programs whose memo copies grow far faster than their length: a tuple doubled through the
/// memo, a long string fetched many times, a long list memoised under many indices.
fn copy_bomb(rng: &mut Rand) -> Vec<Op> {
    let mut ops = Vec::new();
    match rng.random_range(0..3) {
        0 => {
            ops.extend([op(b']', &[]), op(b'q', &[0])]);
            for _ in 0..rng.random_range(16..=48) {
                ops.extend([op(b'h', &[0]), op(b'h', &[0]), op(0x86, &[]), op(b'q', &[0])]);
            }
        }
        1 => {
            ops.extend([op(b'X', &with_length(4, &vec![b'a'; 1 << 16])), op(b'q', &[1])]);
            ops.extend(std::iter::repeat_n(op(b'h', &[1]), rng.random_range(100..20_000)));
        }
        _ => {
            ops.extend([op(b']', &[]), op(b'(', &[])]);
            ops.extend(std::iter::repeat_n(op(b'N', &[]), 10_000));
            ops.push(op(b'e', &[]));
            for i in 0..rng.random_range(100..20_000u32) {
                ops.push(op(b'r', &i.to_le_bytes()));
            }
        }
    }
    ops
}

fn mutate_program(rng: &mut Rand, ops: &mut Vec<Op>) {
    let at = rng.random_range(0..=ops.len());
    let find = |rng: &mut Rand, ops: &[Op], wanted: &dyn Fn(&Op) -> bool| {
        let hits: Vec<usize> = (0..ops.len()).filter(|&i| wanted(&ops[i])).collect();
        (!hits.is_empty()).then(|| *pick(rng, &hits))
    };
    match rng.random_range(0..12) {
        0 => {
            // A boundary value for an integer or a memo index.
            if let Some(i) = find(rng, ops, &|o| b"KMJhqjr".contains(&o.code)) {
                let width = ops[i].arg.len();
                ops[i].arg = interesting(rng, 0).to_le_bytes()[..width].to_vec();
            } else if let Some(i) = find(rng, ops, &|o| o.code == 0x8a) {
                let n = rng.random_range(0..=12u8);
                ops[i].arg = std::iter::once(n).chain((0..n).map(|_| rng.random())).collect();
            }
        }
        1 => {
            // A length that lies about the bytes after it.
            if let Some(i) = find(rng, ops, &|o| matches!(arg_of(o.code), Arg::Counted(_))) {
                let Arg::Counted(width) = arg_of(ops[i].code) else {
                    return;
                };
                let payload = ops[i].arg.len() - width;
                let lie = interesting(rng, payload as u64).to_le_bytes();
                ops[i].arg[..width].copy_from_slice(&lie[..width]);
            }
        }
        2 => {
            if let Some(i) = find(rng, ops, &|o| o.code == b'X') {
                let payload: Vec<u8> = match rng.random_range(0..5) {
                    0 => vec![0xff, 0xfe, b'a'],
                    1 => Vec::new(),
                    2 => b"state_dict".to_vec(),
                    3 => vec![b'9'; rng.random_range(1..10_000)],
                    _ => b"../../data/0".to_vec(),
                };
                ops[i].arg = with_length(4, &payload);
            }
        }
        3 => {
            if let Some(i) = find(rng, ops, &|o| o.code == b'c') {
                ops[i].arg = pick(rng, GLOBALS).as_bytes().to_vec();
            }
        }
        4 => {
            // Another arity or another call: short tuples for the tensor rebuild, BUILD for REDUCE.
            if let Some(i) = find(rng, ops, &|o| b"t\x85\x86\x87)R\x81b".contains(&o.code)) {
                ops[i].code = *pick(rng, b"t\x85\x86\x87)R\x81b");
            }
        }
        5 => {
            for _ in 0..rng.random_range(1..=4) {
                ops.insert(rng.random_range(0..=ops.len()), random_op(rng));
            }
        }
        6 if !ops.is_empty() => {
            let from = rng.random_range(0..ops.len());
            let count = rng.random_range(1..=(ops.len() - from).min(32));
            ops.drain(from..from + count);
        }
        7 if !ops.is_empty() => {
            let from = rng.random_range(0..ops.len());
            let count = rng.random_range(1..=(ops.len() - from).min(64));
            let run: Vec<Op> = ops[from..from + count].to_vec();
            let to = rng.random_range(0..=ops.len());
            ops.splice(to..to, run);
        }
        8 => {
            let run = deep(rng);
            ops.splice(at..at, run);
        }
        9 => {
            let run = copy_bomb(rng);
            ops.splice(at..at, run);
        }
        10 => ops.truncate(at),
        _ => {
            // A memo index no PUT made.
            let get = if rng.random_bool(0.5) {
                op(b'h', &[rng.random()])
            } else {
                op(b'j', &rng.random::<u32>().to_le_bytes())
            };
            ops.insert(at, get);
        }
    }
}

/// The zip's entries, in order.
fn entries(zip: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    let mut archive = zip::ZipArchive::new(Cursor::new(zip)).ok()?;
    let mut out = Vec::new();
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).ok()?;
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).ok()?;
        out.push((entry.name().ok()?.into_owned(), bytes));
    }
    Some(out)
}

fn write_zip(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in entries {
        // A name the writer refuses (a duplicate) is left out.
        if zip.start_file(name.as_str(), options).is_ok() {
            zip.write_all(bytes).unwrap();
        }
    }
    zip.finish().unwrap().into_inner()
}

fn mutate_entries(rng: &mut Rand, entries: &mut Vec<(String, Vec<u8>)>) {
    let i = rng.random_range(0..entries.len());
    match rng.random_range(0..6) {
        0 => {
            let keep = rng.random_range(0..=entries[i].1.len());
            entries[i].1.truncate(keep);
        }
        1 => entries[i].1.extend(std::iter::repeat_n(0x3c, rng.random_range(1..256))),
        2 => {
            entries.remove(i);
        }
        3 => {
            let name = pick(
                rng,
                &[
                    "archive/data/0",
                    "archive/data.pkl",
                    "other/data.pkl",
                    "archive/data/99",
                    "",
                ],
            );
            entries[i].0 = name.to_string();
        }
        4 => {
            // A second pickle beside the first.
            if let Some(pickle) = entries.iter().find(|(n, _)| n.ends_with("data.pkl")).cloned() {
                entries.push((format!("second/{}", pickle.0), pickle.1));
            }
        }
        _ => entries.extend((0..rng.random_range(1..200)).map(|k| (format!("archive/extra/{k}"), Vec::new()))),
    }
}

/// A zip record's signature and its size, count and offset fields as (offset, width).
type Record = (&'static [u8; 4], &'static [(usize, usize)]);

/// Sets a size, count or offset field of a local header, central directory record or end record
/// to a boundary value.
fn mutate_zip_headers(rng: &mut Rand, zip: &mut [u8]) {
    const RECORDS: &[Record] = &[
        (b"PK\x03\x04", &[(8, 2), (18, 4), (22, 4), (26, 2), (28, 2)]),
        (
            b"PK\x01\x02",
            &[(10, 2), (20, 4), (24, 4), (28, 2), (30, 2), (32, 2), (42, 4)],
        ),
        (b"PK\x05\x06", &[(8, 2), (10, 2), (12, 4), (16, 4), (20, 2)]),
    ];
    let (signature, fields) = pick(rng, RECORDS);
    let starts: Vec<usize> = zip
        .windows(4)
        .enumerate()
        .filter(|(_, w)| w == signature)
        .map(|(i, _)| i)
        .collect();
    if starts.is_empty() {
        return;
    }
    let start = *pick(rng, &starts);
    let (offset, width) = *pick(rng, fields);
    let value = interesting(rng, zip.len() as u64).to_le_bytes();
    if let Some(field) = zip.get_mut(start + offset..start + offset + width) {
        field.copy_from_slice(&value[..width]);
    }
}

/// A new checkpoint from `seeds[index]`.
pub fn mutate(rng: &mut Rand, index: usize, seeds: &[Seed]) -> Vec<u8> {
    let seed = &seeds[index].bytes;
    let mut zip = match entries(seed) {
        Some(mut entries) if !entries.is_empty() && rng.random_bool(0.85) => {
            if let Some((_, program)) = entries.iter_mut().find(|(n, _)| n.ends_with("data.pkl")) {
                if let Some(mut ops) = split(program).filter(|_| rng.random_bool(0.8)) {
                    for _ in 0..rng.random_range(1..=3) {
                        mutate_program(rng, &mut ops);
                    }
                    *program = join(&ops);
                } else {
                    havoc(rng, program, &[]);
                }
            }
            if rng.random_bool(0.2) {
                mutate_entries(rng, &mut entries);
            }
            write_zip(&entries)
        }
        _ => seed.clone(),
    };
    if rng.random_bool(0.15) {
        mutate_zip_headers(rng, &mut zip);
    }
    if zip == *seed || rng.random_bool(0.1) {
        havoc(rng, &mut zip, seeds);
    }
    zip
}
