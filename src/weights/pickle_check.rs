//! A PyTorch zip checkpoint (`.ckpt`, `.pt`, `.pth`, `.bin`) checked before its tensors are read:
//! the pickle program in `*/data.pkl` may name only the globals plain tensor storage needs.
//!
//! Nothing in sdfix ever executes a pickle: candle's reader (`candle_core::pickle`) interprets the
//! opcodes as data and never calls what a `GLOBAL` names. But a file that names `os.system` or
//! `builtins.eval` was made to run code in Python tools, and one that names a class we do not know
//! holds something other than tensors: both are refused, with the global named, instead of
//! being read "around". The allowed list is AUTOMATIC1111's `safe.py` restricted unpickler's, less
//! PyTorch Lightning's callbacks.
//!
//! Every `GLOBAL` opcode is seen, also those whose result never reaches the state dict: the
//! program is stepped one opcode at a time and the stack top checked after each. Opcodes candle's
//! reader does not know (`STACK_GLOBAL` of protocol 4, `INST`, `OBJ`, `POP`) are refused too;
//! `torch.save` writes protocol 2, which needs none of them.

use std::io::{BufReader, Read};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::pickle::{Object, Stack};

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

/// Checks every `data.pkl` in the zip at `path`; an error names the file, the global, and the way
/// out (a `.safetensors` copy).
pub fn check(path: &Path) -> Result<()> {
    let label = path.display();
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {label}"))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file))
        .with_context(|| format!("{label} is not a PyTorch zip checkpoint (legacy pickles are not read)"))?;
    let pickles: Vec<String> = zip
        .file_names()
        .filter_map(|name| name.ok().map(|n| n.into_owned()))
        .filter(|name| name.ends_with("data.pkl"))
        .collect();
    if pickles.is_empty() {
        bail!("{label}: no data.pkl in the zip; not a PyTorch checkpoint");
    }
    for name in pickles {
        let entry = zip
            .by_name(&name)
            .with_context(|| format!("{label}: cannot read {name}"))?;
        check_pickle(BufReader::new(entry)).with_context(|| {
            format!("{label} refused: its pickle holds more than plain tensors (convert it to .safetensors with a tool you trust)")
        })?;
    }
    Ok(())
}

/// Steps through one pickle program, checking each global it names.
pub fn check_pickle<R: Read>(reader: BufReader<R>) -> Result<()> {
    let mut reader = reader;
    let mut stack = Stack::empty();
    loop {
        let done = stack
            .read(&mut reader)
            .map_err(|err| anyhow::anyhow!("pickle opcode not allowed or not understood: {err}"))?;
        if let Some(Object::Class {
            module_name,
            class_name,
        }) = stack.stack().last()
        {
            let global = format!("{module_name}.{class_name}");
            if !ALLOWED_GLOBALS.contains(&global.as_str()) {
                bail!("global {global} is not allowed");
            }
        }
        if done {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> Result<()> {
        check_pickle(BufReader::new(bytes))
    }

    #[test]
    fn a_code_executing_global_is_refused() {
        // PROTO 2; GLOBAL os system; BINUNICODE "echo"; TUPLE1; REDUCE; STOP
        let mut program = vec![0x80, 2];
        program.extend(b"cos\nsystem\n");
        program.extend([b'X', 4, 0, 0, 0]);
        program.extend(b"echo");
        program.extend([0x85, b'R', b'.']);
        let err = run(&program).unwrap_err().to_string();
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

    #[test]
    fn unknown_opcodes_are_refused() {
        // PROTO 4; STACK_GLOBAL (protocol 4's way to name a global, from strings on the stack).
        let err = run(&[0x80, 4, 0x93]).unwrap_err().to_string();
        assert!(err.contains("not understood"), "{err}");
    }
}
