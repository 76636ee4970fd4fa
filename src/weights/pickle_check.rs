//! A PyTorch zip checkpoint (`.ckpt`, `.pt`, `.pth`, `.bin`) checked before its tensors are read:
//! the pickle program in `*/data.pkl` may name only the globals plain tensor storage needs, and
//! may not make candle's reader build more than the file holds.
//!
//! Nothing in sdfix ever executes a pickle: candle's reader (`candle_core::pickle`) interprets the
//! opcodes as data and never calls what a `GLOBAL` names. But a file that names `os.system` or
//! `builtins.eval` was made to run code in Python tools, and one that names a class we do not know
//! holds something other than tensors: both are refused, with the global named, instead of
//! being read "around". The allowed list is AUTOMATIC1111's `safe.py` restricted unpickler's, less
//! PyTorch Lightning's callbacks.
//!
//! The check runs the program on a shadow of candle's stack (each object's kind, nesting depth
//! and size, not its value), opcode for opcode as candle's `Stack::read` does, and refuses what
//! would make that reader allocate, recurse or panic on a hostile file (found by
//! tests/fuzz_readers.rs):
//! - a length (BINUNICODE's) past the end of the program: candle allocates it before reading;
//! - objects nested deeper than [`MAX_DEPTH`]: candle drops and clones them recursively, and a
//!   million TUPLE1s overflow the stack;
//! - memo copies past [`copy_budget`]: candle copies the whole object on every PUT and GET, so a
//!   tuple doubled through the memo 40 times asks for terabytes;
//! - opcodes candle's reader does not know (`STACK_GLOBAL` of protocol 4, `INST`, `OBJ`, `POP`),
//!   and LONG1 integers over 8 bytes (candle shifts them past 64 bits);
//! - tensor rebuilds with fewer arguments than candle takes out of them (it indexes them
//!   unchecked), and persistent ids other than torch's 5-tuple storage keys.
//!
//! Every `GLOBAL` opcode is seen, also those whose result never reaches the state dict.
//! `torch.save` writes protocol 2, which needs none of the refused opcodes. Then, once candle
//! has listed the tensors, [`check_tensors`] checks each against its storage entry: candle
//! allocates a tensor's declared size before reading it.

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::pickle::{Object, PthTensors};

/// `module.name` globals a tensor checkpoint may name.
const ALLOWED_GLOBALS: &[&str] = &[
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch.FloatStorage",
    "torch.HalfStorage",
    "torch.BFloat16Storage",
    "torch.DoubleStorage",
    "torch.LongStorage",
    "torch.IntStorage",
    "torch.ShortStorage",
    "torch.CharStorage",
    "torch.ByteStorage",
    "torch.BoolStorage",
    // Plain numbers beside the state dict (`global_step` as a numpy scalar).
    "numpy.core.multiarray.scalar",
    "numpy.dtype",
    "_codecs.encode",
];

/// A `data.pkl` past this is no tensor index (SD's are 80-300 KB); it is read whole to be checked.
const MAX_PICKLE_BYTES: u64 = 256 << 20;
/// Tensor checkpoints nest about 8 deep (dict, tensor, its arguments, storage key, class);
/// candle's reader drops, clones and compares objects recursively.
const MAX_DEPTH: u32 = 64;
/// Memo copies may total this, whatever the program's size.
const COPY_BASE_BYTES: u64 = 64 << 20;
/// ... plus this much per byte of program: torch's own pickles copy about 20 (each tensor entry
/// memoises its arguments and fetches the rebuild function, storage class and device; the test
/// `a_torch_checkpoint_copies_far_less_than_its_budget` measures it).
const COPY_BYTES_PER_PROGRAM_BYTE: u64 = 256;
/// torch's persistent id of a storage: `('storage', storage_type, key, location, numel)`.
const STORAGE_KEY_FIELDS: usize = 5;
/// Arguments candle takes out of each call, unchecked: `_rebuild_tensor_v2(storage,
/// storage_offset, size, stride, ...)` and `_rebuild_parameter(data, ...)`.
const REBUILD_ARGUMENTS: &[(&str, usize)] = &[
    ("torch._utils._rebuild_tensor_v2", 4),
    ("torch._utils._rebuild_parameter", 1),
];
/// Calls candle's reader turns into an empty dict (their arguments dropped).
const DICT_CALLS: &[&str] = &["collections.OrderedDict", "collections.defaultdict"];
/// LONG1 integers candle can hold (it shifts each byte into an i64).
const MAX_LONG1_BYTES: u8 = 8;

/// The memo copies a program of `program_bytes` may make, in bytes of candle objects.
fn copy_budget(program_bytes: usize) -> u64 {
    COPY_BASE_BYTES + COPY_BYTES_PER_PROGRAM_BYTE * program_bytes as u64
}

/// Checks every `data.pkl` in the zip at `path`; an error names the file, what was refused, and
/// the way out (a `.safetensors` copy).
pub fn check(path: &Path) -> Result<()> {
    let label = path.display();
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {label}"))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file))
        .with_context(|| format!("{label} is not a PyTorch zip checkpoint (legacy pickles are not read)"))?;
    let names: Vec<String> = zip
        .file_names()
        .filter_map(|name| name.ok().map(|n| n.into_owned()))
        .collect();
    // Entry names go into messages, as tensor names do (see `check_tensors`).
    if let Some(name) = names.iter().find(|name| name.chars().any(char::is_control)) {
        bail!("{label} is not a weights file: zip entry {name:?} holds a control character");
    }
    let pickles: Vec<String> = names.into_iter().filter(|name| name.ends_with("data.pkl")).collect();
    if pickles.is_empty() {
        bail!("{label}: no data.pkl in the zip; not a PyTorch checkpoint");
    }
    for name in pickles {
        let entry = zip
            .by_name(&name)
            .with_context(|| format!("{label}: cannot read {name}"))?;
        let mut program = Vec::new();
        entry
            .take(MAX_PICKLE_BYTES + 1)
            .read_to_end(&mut program)
            .with_context(|| format!("{label}: cannot read {name}"))?;
        ensure!(
            program.len() as u64 <= MAX_PICKLE_BYTES,
            "{label}: {name} is over {MAX_PICKLE_BYTES} bytes; not a tensor index"
        );
        check_pickle(&program).with_context(|| {
            format!("{label} refused: its pickle holds more than plain tensors (convert it to .safetensors with a tool you trust)")
        })?;
    }
    Ok(())
}

/// Checks that each tensor candle listed lies inside its storage entry, an uncompressed entry
/// of the zip at `path` (candle allocates the declared shape before reading the bytes), and that
/// no name holds a control character.
pub fn check_tensors(path: &Path, tensors: &PthTensors) -> Result<()> {
    let label = path.display();
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {label}"))?;
    let file_bytes = file.metadata().with_context(|| format!("cannot read {label}"))?.len();
    let mut zip = zip::ZipArchive::new(BufReader::new(file))
        .with_context(|| format!("{label} is not a PyTorch zip checkpoint"))?;
    // In name order, so that the same file gives the same error.
    let mut infos: Vec<_> = tensors.tensor_infos().iter().collect();
    infos.sort_unstable_by_key(|(name, _)| *name);
    for (name, info) in infos {
        // Names go into messages and listings (see the safetensors reader).
        ensure!(
            !name.chars().chain(info.path.chars()).any(char::is_control),
            "{label} is not a weights file: tensor name {name:?} or its storage {:?} holds a control character",
            info.path
        );
        let entry = zip
            .by_name(&info.path)
            .with_context(|| format!("{label}: tensor {name}: cannot read its storage {}", info.path))?;
        ensure!(
            entry.compression() == zip::CompressionMethod::Stored,
            "{label}: storage {} is compressed; PyTorch stores storages as they are",
            info.path
        );
        let stored = entry.size().min(entry.compressed_size()).min(file_bytes);
        let layout = &info.layout;
        let needed = layout
            .dims()
            .iter()
            .try_fold(info.dtype.size_in_bytes(), |bytes, &dim| bytes.checked_mul(dim))
            .and_then(|bytes| bytes.checked_add(layout.start_offset()));
        ensure!(
            needed.is_some_and(|needed| needed as u64 <= stored),
            "{label}: tensor {name} {:?} at byte {} does not fit in its {stored}-byte storage",
            layout.dims(),
            layout.start_offset()
        );
        ensure!(
            layout.is_contiguous() || layout.is_fortran_contiguous(),
            "{label}: tensor {name} has strides {:?} for shape {:?}, which sdfix cannot read",
            layout.stride(),
            layout.dims()
        );
    }
    Ok(())
}

/// What the check knows of one object on candle's stack.
#[derive(Clone, Debug)]
struct Shadow {
    kind: Kind,
    /// Nesting depth: 1 for a leaf.
    depth: u32,
    /// About what candle's object takes, children and strings included.
    bytes: u64,
}

#[derive(Clone, Debug, PartialEq)]
enum Kind {
    Mark,
    Global(String),
    Tuple(usize),
    List,
    Dict,
    Other,
}

/// Candle's `Object`, without what it owns.
const OBJECT_BYTES: u64 = std::mem::size_of::<Object>() as u64;

impl Shadow {
    fn leaf(kind: Kind, heap_bytes: usize) -> Self {
        Self {
            kind,
            depth: 1,
            bytes: OBJECT_BYTES + heap_bytes as u64,
        }
    }

    /// An object holding `parts`.
    fn holding(kind: Kind, parts: &[Shadow]) -> Self {
        Self {
            kind,
            depth: 1 + parts.iter().map(|p| p.depth).max().unwrap_or(0),
            bytes: OBJECT_BYTES + parts.iter().map(|p| p.bytes).sum::<u64>(),
        }
    }
}

/// The unread rest of a program, with where it stands for messages.
struct Program<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Program<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        ensure!(n <= self.bytes.len() - self.at, "the pickle ends inside an opcode");
        let taken = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut array = [0; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    /// Up to a newline, as candle's `read_to_newline` reads it.
    fn line(&mut self) -> Result<String> {
        let rest = &self.bytes[self.at..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .context("the pickle ends inside a GLOBAL")?;
        let line = &self.take(end + 1)?[..end];
        Ok(String::from_utf8_lossy(line.strip_suffix(b"\r").unwrap_or(line)).into_owned())
    }
}

/// candle's stack and memo, in shadow.
struct Machine {
    stack: Vec<Shadow>,
    memo: HashMap<u32, Shadow>,
    copied: u64,
    budget: u64,
}

impl Machine {
    fn push(&mut self, shadow: Shadow) -> Result<()> {
        ensure!(shadow.depth <= MAX_DEPTH, "objects nested more than {MAX_DEPTH} deep");
        self.stack.push(shadow);
        Ok(())
    }

    fn pop(&mut self) -> Result<Shadow> {
        self.stack.pop().context("an opcode takes from an empty stack")
    }

    fn pop_to_mark(&mut self) -> Result<Vec<Shadow>> {
        let mark = self
            .stack
            .iter()
            .rposition(|s| s.kind == Kind::Mark)
            .context("an opcode needs a MARK and there is none")?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items)
    }

    /// A copy candle makes of a whole object (memo PUT and GET).
    fn copy(&mut self, shadow: &Shadow) -> Result<()> {
        self.copied += shadow.bytes;
        ensure!(
            self.copied <= self.budget,
            "memo copies past {} bytes (an object copied over and over)",
            self.budget
        );
        Ok(())
    }

    /// Adds `parts` to the list or dict on top of the stack.
    fn extend_top(&mut self, kind: Kind, parts: &[Shadow]) -> Result<()> {
        let top = self.stack.last_mut().context("an opcode takes from an empty stack")?;
        ensure!(
            top.kind == kind,
            "an opcode adds to a {kind:?} and the stack holds a {:?}",
            top.kind
        );
        top.bytes += parts.iter().map(|p| p.bytes).sum::<u64>();
        top.depth = top.depth.max(1 + parts.iter().map(|p| p.depth).max().unwrap_or(0));
        ensure!(top.depth <= MAX_DEPTH, "objects nested more than {MAX_DEPTH} deep");
        Ok(())
    }

    /// REDUCE and NEWOBJ: candle takes arguments out of the tensor rebuilds without looking.
    fn call(&mut self, reduce: bool) -> Result<()> {
        let args = self.pop()?;
        let callable = self.pop()?;
        if let Kind::Global(name) = &callable.kind {
            if reduce && DICT_CALLS.contains(&name.as_str()) {
                return self.push(Shadow::leaf(Kind::Dict, 0));
            }
            if let Some((_, needed)) = REBUILD_ARGUMENTS.iter().find(|(n, _)| n == name) {
                ensure!(
                    matches!(args.kind, Kind::Tuple(n) if n >= *needed),
                    "{name} is called with other than a tuple of at least {needed} arguments"
                );
            }
        }
        self.push(Shadow::holding(Kind::Other, &[callable, args]))
    }

    /// One opcode, as candle's `Stack::read` runs it; `true` at STOP.
    fn step(&mut self, program: &mut Program) -> Result<bool> {
        let [code] = program.array()?;
        match code {
            0x80 => drop(program.take(1)?),
            b'c' => {
                let global = format!("{}.{}", program.line()?, program.line()?);
                // Escaped: the name is the file's bytes, and goes to a terminal.
                ensure!(
                    ALLOWED_GLOBALS.contains(&global.as_str()),
                    "global {} is not allowed",
                    global.escape_debug()
                );
                let bytes = global.len();
                self.push(Shadow::leaf(Kind::Global(global), bytes))?;
            }
            b'K' | b'M' | b'J' | b'G' => {
                program.take(match code {
                    b'K' => 1,
                    b'M' => 2,
                    b'J' => 4,
                    _ => 8,
                })?;
                self.push(Shadow::leaf(Kind::Other, 0))?;
            }
            0x8a => {
                let [count] = program.array()?;
                ensure!(count <= MAX_LONG1_BYTES, "a LONG1 integer of {count} bytes");
                program.take(count.into())?;
                self.push(Shadow::leaf(Kind::Other, 0))?;
            }
            b'X' => {
                let length = u32::from_le_bytes(program.array()?) as usize;
                let text = program.take(length)?;
                ensure!(
                    std::str::from_utf8(text).is_ok(),
                    "a BINUNICODE string that is not UTF-8"
                );
                self.push(Shadow::leaf(Kind::Other, length))?;
            }
            b'Q' => {
                let id = self.pop()?;
                ensure!(
                    id.kind == Kind::Tuple(STORAGE_KEY_FIELDS),
                    "a persistent id other than a storage key"
                );
                self.push(Shadow::holding(Kind::Other, &[id]))?;
            }
            b't' => {
                let items = self.pop_to_mark()?;
                self.push(Shadow::holding(Kind::Tuple(items.len()), &items))?;
            }
            0x85..=0x87 => {
                let count = usize::from(code - 0x84);
                ensure!(self.stack.len() >= count, "an opcode takes from an empty stack");
                let items = self.stack.split_off(self.stack.len() - count);
                self.push(Shadow::holding(Kind::Tuple(count), &items))?;
            }
            0x88 | 0x89 | b'N' => self.push(Shadow::leaf(Kind::Other, 0))?,
            b'a' => {
                let value = self.pop()?;
                self.extend_top(Kind::List, &[value])?;
            }
            b'e' => {
                let items = self.pop_to_mark()?;
                self.extend_top(Kind::List, &items)?;
            }
            b's' => {
                let value = self.pop()?;
                let key = self.pop()?;
                self.extend_top(Kind::Dict, &[key, value])?;
            }
            b'u' => {
                let items = self.pop_to_mark()?;
                ensure!(items.len() % 2 == 0, "SETITEMS with an odd number of objects");
                self.extend_top(Kind::Dict, &items)?;
            }
            // candle reads DICT as EMPTY_DICT: its MARK and items stay on the stack.
            b'}' | b'd' => self.push(Shadow::leaf(Kind::Dict, 0))?,
            b'(' => self.push(Shadow::leaf(Kind::Mark, 0))?,
            b')' => self.push(Shadow::leaf(Kind::Tuple(0), 0))?,
            b']' => self.push(Shadow::leaf(Kind::List, 0))?,
            b'b' => {
                let args = self.pop()?;
                let object = self.pop()?;
                // Two dicts merge; anything else becomes a BUILD object holding both.
                let kind = if (&object.kind, &args.kind) == (&Kind::Dict, &Kind::Dict) {
                    Kind::Dict
                } else {
                    Kind::Other
                };
                self.push(Shadow::holding(kind, &[object, args]))?;
            }
            b'R' => self.call(true)?,
            0x81 => self.call(false)?,
            b'h' | b'j' => {
                let index = if code == b'h' {
                    u32::from(program.array::<1>()?[0])
                } else {
                    u32::from_le_bytes(program.array()?)
                };
                let shadow = self
                    .memo
                    .get(&index)
                    .cloned()
                    .with_context(|| format!("memo {index} is empty"))?;
                self.copy(&shadow)?;
                self.push(shadow)?;
            }
            b'q' | b'r' => {
                let index = if code == b'q' {
                    u32::from(program.array::<1>()?[0])
                } else {
                    u32::from_le_bytes(program.array()?)
                };
                let top = self.stack.last().cloned().context("PUT on an empty stack")?;
                self.copy(&top)?;
                self.memo.insert(index, top);
            }
            b'.' => return Ok(true),
            other => bail!("opcode 0x{other:02x} not allowed or not understood"),
        }
        Ok(false)
    }
}

/// Runs one pickle program in shadow, checking each global it names and what candle's reader
/// would build from it.
pub fn check_pickle(bytes: &[u8]) -> Result<()> {
    run_in_shadow(bytes).map(drop)
}

/// [`check_pickle`], returning the bytes of memo copies the program makes.
fn run_in_shadow(bytes: &[u8]) -> Result<u64> {
    let mut machine = Machine {
        stack: Vec::new(),
        memo: HashMap::new(),
        copied: 0,
        budget: copy_budget(bytes.len()),
    };
    let mut program = Program { bytes, at: 0 };
    loop {
        let at = program.at;
        match machine.step(&mut program) {
            Ok(true) => return Ok(machine.copied),
            Ok(false) => {}
            Err(err) => bail!("byte {at} of the pickle: {err:#}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> Result<()> {
        check_pickle(bytes)
    }

    #[test]
    fn a_code_executing_global_is_refused() {
        // PROTO 2; GLOBAL os system; BINUNICODE "echo"; TUPLE1; REDUCE; STOP
        let mut program = vec![0x80, 2];
        program.extend(b"cos\nsystem\n");
        program.extend([b'X', 4, 0, 0, 0]);
        program.extend(b"echo");
        program.extend([0x85, b'R', b'.']);
        let err = format!("{:#}", run(&program).unwrap_err());
        assert!(err.contains("global os.system is not allowed"), "{err}");
    }

    #[test]
    fn an_ordered_dict_is_fine() {
        // PROTO 2; GLOBAL collections OrderedDict; EMPTY_TUPLE; REDUCE; STOP
        let mut program = vec![0x80, 2];
        program.extend(b"ccollections\nOrderedDict\n");
        program.extend([b')', b'R', b'.']);
        run(&program).unwrap();
    }

    /// PROTO 2, `body`, STOP.
    fn program(body: &[u8]) -> Vec<u8> {
        [&[0x80, 2][..], body, b"."].concat()
    }

    fn refused(body: &[u8]) -> String {
        format!("{:#}", run(&program(body)).unwrap_err())
    }

    /// The fixture checkpoint (torch.save of a tiny SD 2 state dict) passes, and its memo copies
    /// take a small part of the budget a program of its size gets.
    #[test]
    fn a_torch_checkpoint_copies_far_less_than_its_budget() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/single-file/tiny-sd2-f16.ckpt");
        let mut zip = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
        let mut bytes = Vec::new();
        zip.by_name("tiny-sd2-f16/data.pkl")
            .unwrap()
            .read_to_end(&mut bytes)
            .unwrap();
        let copied = run_in_shadow(&bytes).unwrap();
        let per_byte = copied as f64 / bytes.len() as f64;
        assert!(
            per_byte < COPY_BYTES_PER_PROGRAM_BYTE as f64 / 4.0,
            "{copied} bytes copied by a {}-byte program",
            bytes.len()
        );
    }

    /// Found by tests/fuzz_readers.rs: candle allocated BINUNICODE's length (here 4 GB) before
    /// reading a byte of it.
    #[test]
    fn a_length_past_the_end_is_refused_before_anything_is_allocated() {
        let err = refused(&[b'X', 0xff, 0xff, 0xff, 0xff, b'a']);
        assert!(err.contains("ends inside an opcode"), "{err}");
    }

    /// Found by tests/fuzz_readers.rs: candle dropped a million nested tuples recursively and
    /// overflowed the stack, which aborts the process.
    #[test]
    fn deep_nesting_is_refused() {
        let mut body = vec![b')'];
        body.extend([0x85; 1_000_000]);
        let err = refused(&body);
        assert!(err.contains("nested more than 64 deep"), "{err}");
        // A list of lists, through APPEND.
        let mut body = vec![b']'; 100];
        body.extend([b'a'; 99]);
        assert!(refused(&body).contains("nested"));
    }

    /// A tuple doubled through the memo: 200 bytes of program, 2^48 objects in candle's reader.
    #[test]
    fn memo_copy_bombs_are_refused() {
        let mut body = vec![b']', b'q', 0];
        for _ in 0..48 {
            body.extend([b'h', 0, b'h', 0, 0x86, b'q', 0]);
        }
        let err = refused(&body);
        assert!(err.contains("memo copies past"), "{err}");
        // One long string fetched over and over.
        let mut body = vec![b'X', 0, 0, 1, 0];
        body.extend([b'a'; 1 << 16]);
        body.extend([b'q', 1]);
        for _ in 0..100_000 {
            body.extend([b'h', 1]);
        }
        assert!(refused(&body).contains("memo copies past"));
    }

    /// Found by tests/fuzz_readers.rs: candle takes four arguments out of every
    /// `_rebuild_tensor_v2` call and five fields out of every storage key, unchecked (a panic).
    #[test]
    fn short_tensor_rebuilds_and_storage_keys_are_refused() {
        let rebuild = b"ctorch._utils\n_rebuild_tensor_v2\n";
        let err = refused(&[&rebuild[..], &[b'K', 0, 0x85, b'R']].concat());
        assert!(
            err.contains("_rebuild_tensor_v2 is called with other than a tuple of at least 4"),
            "{err}"
        );
        let parameter = b"ctorch._utils\n_rebuild_parameter\n";
        assert!(refused(&[&parameter[..], b")R"].concat()).contains("_rebuild_parameter"));
        let err = refused(&[b'K', 0, 0x85, b'Q']);
        assert!(err.contains("persistent id other than a storage key"), "{err}");
    }

    #[test]
    fn bad_memo_indices_and_long_integers_are_refused() {
        assert!(refused(&[b'h', 7]).contains("memo 7 is empty"));
        assert!(refused(&[b'q', 0]).contains("PUT on an empty stack"));
        // candle shifts each byte of a LONG1 into an i64.
        let err = refused(&[0x8a, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert!(err.contains("LONG1 integer of 9 bytes"), "{err}");
        run(&program(&[0x8a, 8, 1, 2, 3, 4, 5, 6, 7, 8])).unwrap();
    }

    #[test]
    fn a_global_name_is_escaped_in_the_error() {
        let err = refused(b"cos\x1b[2J\nsystem\n");
        assert!(err.contains(r"global os\u{1b}[2J.system is not allowed"), "{err}");
    }

    #[test]
    fn unknown_opcodes_are_refused() {
        // PROTO 4; STACK_GLOBAL (protocol 4's way to name a global, from strings on the stack).
        let err = format!("{:#}", run(&[0x80, 4, 0x93]).unwrap_err());
        assert!(err.contains("not understood"), "{err}");
    }
}
