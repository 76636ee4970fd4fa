#!/usr/bin/env python3
"""The seed corpus of tests/fuzz_readers.rs: small valid files for each reader it fuzzes.

Standard library only (no torch): the `.ckpt` files are pickled the way `torch.save` pickles a state
dict (protocol 2; `torch._utils._rebuild_tensor_v2` over persistent storage keys
`('storage', torch.HalfStorage, '0', 'cpu', numel)`, memoised with BINPUT/BINGET), with stand-in
modules named `torch` and `torch._utils` so that pickle writes the same GLOBAL opcodes, and zipped
uncompressed under `archive/` as torch does. Values are fixed, so the output is the same on every run:

    python3 scripts/make_fuzz_corpus.py

Writes tests/fixtures/fuzz/:
- safetensors/: every dtype candle reads and some it does not (I32, BOOL), a scalar, an empty
  tensor, `__metadata__`; a file with no tensors; the single-file pipeline reference.
- ckpt/: an LDM checkpoint (state dict under "state_dict", a `global_step`, f16, a tensor that is
  a view at an offset into a shared storage, a Fortran-ordered one, one `_rebuild_parameter`), and
  a bare f32 state dict (an OrderedDict, as `torch.save(model.state_dict())` writes).
- lora/: a kohya LoRA (tests/fixtures/single-file/tiny-lora.safetensors) and a diffusers PEFT one
  (lora_A/lora_B, with alphas, a 3x3 convolution and the text encoder) for tests/fixtures/tiny-sd.
- READER/regressions/: the handmade regression cases (`write_handmade_regressions`); the others
  there are inputs the fuzzer found, committed as it saved them (docs/testing.md lists them all).
"""

import collections
import io
import json
import math
import pathlib
import pickle
import shutil
import struct
import sys
import types
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "fuzz"
SINGLE = ROOT / "tests" / "fixtures" / "single-file"
# A fixed date keeps the zips byte-identical between runs.
ZIP_DATE = (2024, 1, 1, 0, 0, 0)

# --- safetensors ---------------------------------------------------------------------------------

# struct formats; BF16 is written as the upper half of an f32.
FORMATS = {"F64": "d", "F32": "f", "F16": "e", "I64": "q", "I32": "i", "U32": "I", "U8": "B", "BOOL": "?"}


def safetensors_bytes(tensors, metadata=None):
    """tensors: [(name, dtype, shape, values)] -> the file's bytes (header padded to 8 as the
    reference writer does)."""
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, values in tensors:
        if dtype == "BF16":
            raw = b"".join(struct.pack("<f", v)[2:] for v in values)
        else:
            raw = b"".join(struct.pack("<" + FORMATS[dtype], v) for v in values)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def ramp(n, scale=0.25):
    return [((i * 7) % 11 - 5) * scale for i in range(n)]


def write_safetensors():
    out = OUT / "safetensors"
    out.mkdir(parents=True, exist_ok=True)
    tensors = [
        ("f32", "F32", [2, 3], ramp(6)),
        ("f16", "F16", [3, 2], ramp(6)),
        ("bf16", "BF16", [4], ramp(4)),
        ("f64", "F64", [2], ramp(2)),
        ("i64", "I64", [2, 2], [1, -2, 3, 4]),
        ("u32", "U32", [3], [1, 2, 3]),
        ("u8", "U8", [5], [0, 1, 2, 254, 255]),
        ("i32", "I32", [2], [7, -7]),
        ("bool", "BOOL", [3], [True, False, True]),
        ("scalar", "F32", [], [1.5]),
        ("empty", "F32", [0, 4], []),
        ("model.diffusion_model.out.2.weight", "F16", [4, 2, 3, 3], ramp(72, 0.01)),
    ]
    metadata = {"format": "pt", "modelspec.title": "fuzz seed", "modelspec.prediction_type": "v"}
    (out / "dtypes.safetensors").write_bytes(safetensors_bytes(tensors, metadata))
    (out / "empty.safetensors").write_bytes(safetensors_bytes([]))
    shutil.copy(SINGLE / "pipeline.safetensors", out / "pipeline.safetensors")


# --- ckpt ----------------------------------------------------------------------------------------


def _stand_in(module, name, value):
    value.__module__ = module
    value.__qualname__ = name
    setattr(sys.modules[module], name, value)
    return value


sys.modules["torch"] = types.ModuleType("torch")
sys.modules["torch._utils"] = types.ModuleType("torch._utils")
_rebuild_tensor_v2 = _stand_in("torch._utils", "_rebuild_tensor_v2", lambda *args: None)
_rebuild_parameter = _stand_in("torch._utils", "_rebuild_parameter", lambda *args: None)
STORAGES = {
    name: _stand_in("torch", name, type(name, (), {})) for name in ["HalfStorage", "FloatStorage", "LongStorage"]
}
STORAGE_FORMAT = {"HalfStorage": "e", "FloatStorage": "f", "LongStorage": "q"}


class Storage:
    def __init__(self, kind, key, values):
        self.kind, self.key, self.values = kind, key, values

    def data(self):
        return b"".join(struct.pack("<" + STORAGE_FORMAT[self.kind], v) for v in self.values)


class Tensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def __reduce__(self):
        args = (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict())
        return (_rebuild_tensor_v2, args)


class Parameter:
    def __init__(self, tensor):
        self.tensor = tensor

    def __reduce__(self):
        return (_rebuild_parameter, (self.tensor, True, collections.OrderedDict()))


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", STORAGES[obj.kind], obj.key, "cpu", len(obj.values))
        return None


def contiguous(shape):
    stride, acc = [], 1
    for dim in reversed(shape):
        stride.insert(0, acc)
        acc *= dim
    return stride


def ckpt_bytes(root, storages, archive="archive"):
    buffer = io.BytesIO()
    TorchPickler(buffer, protocol=2).dump(root)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as z:
        def add(name, data):
            z.writestr(zipfile.ZipInfo(f"{archive}/{name}", ZIP_DATE), data)

        add("data.pkl", buffer.getvalue())
        add("byteorder", b"little")
        for storage in storages:
            add(f"data/{storage.key}", storage.data())
        add("version", b"3\n")
    return out.getvalue()


def write_ckpt():
    out = OUT / "ckpt"
    out.mkdir(parents=True, exist_ok=True)
    conv = Storage("HalfStorage", "0", ramp(4 * 2 * 3 * 3, 0.01))
    shared = Storage("HalfStorage", "1", ramp(12))
    linear = Storage("HalfStorage", "2", ramp(8))
    state = {
        "model.diffusion_model.input_blocks.0.0.weight": Tensor(conv, 0, [4, 2, 3, 3], contiguous([4, 2, 3, 3])),
        "model.diffusion_model.input_blocks.0.0.bias": Tensor(shared, 0, [4], [1]),
        "model.diffusion_model.out.0.weight": Tensor(shared, 4, [4], [1]),
        "model.diffusion_model.out.0.bias": Tensor(shared, 8, [2, 2], [2, 1]),
        # Fortran order: shape (2, 4), strides (1, 2).
        "first_stage_model.quant_conv.weight": Tensor(linear, 0, [2, 4], [1, 2]),
        "cond_stage_model.model.ln_final.weight": Parameter(Tensor(linear, 2, [4], [1])),
    }
    (out / "ldm.ckpt").write_bytes(ckpt_bytes({"state_dict": state, "global_step": 470000}, [conv, shared, linear]))

    weights = Storage("FloatStorage", "0", ramp(6))
    steps = Storage("LongStorage", "1", [1000])
    bare = collections.OrderedDict(
        [
            ("conv_in.weight", Tensor(weights, 0, [1, 2, 1, 3], contiguous([1, 2, 1, 3]))),
            ("num_batches_tracked", Tensor(steps, 0, [], [])),
        ]
    )
    (out / "state-dict.pt").write_bytes(ckpt_bytes(bare, [weights, steps], archive="state-dict"))


# --- LoRA ----------------------------------------------------------------------------------------


def write_lora():
    out = OUT / "lora"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(SINGLE / "tiny-lora.safetensors", out / "kohya.safetensors")
    rank = 2
    tensors = []
    # (module, in features, out features, kernel): modules of tests/fixtures/tiny-sd.
    for module, fan_in, fan_out, kernel in [
        ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k", 16, 16, None),
        ("unet.conv_in", 4, 16, 3),
        ("text_encoder.text_model.encoder.layers.0.self_attn.v_proj", 32, 32, None),
    ]:
        down_shape = [rank, fan_in] + ([kernel, kernel] if kernel else [])
        up_shape = [fan_out, rank] + ([1, 1] if kernel else [])
        tensors.append((f"{module}.lora_A.weight", "F32", down_shape, ramp(math.prod(down_shape), 0.01)))
        tensors.append((f"{module}.lora_B.weight", "F32", up_shape, ramp(math.prod(up_shape), 0.01)))
        tensors.append((f"{module}.alpha", "F32", [], [1.0]))
    (out / "peft.safetensors").write_bytes(safetensors_bytes(tensors, {"format": "pt"}))


class ShortRebuild(Tensor):
    """A tensor rebuilt from three arguments: candle takes a fourth out unchecked."""

    def __reduce__(self):
        return (_rebuild_tensor_v2, (self.storage, self.offset, self.size))


def write_handmade_regressions():
    """Inputs for bugs the fuzzer's runs on the unfixed readers did not reach first (a run ends at
    the first abort); the inputs it found are copied into regressions/ as they were saved."""
    out = OUT / "ckpt" / "regressions"
    out.mkdir(parents=True, exist_ok=True)
    storage = Storage("HalfStorage", "0", ramp(18))
    # 2^31 - 1 rows of a contiguous [*, 2, 3, 3] tensor: candle allocated 77 GB before reading.
    huge = Tensor(storage, 0, [2**31 - 1, 2, 3, 3], [18, 9, 3, 1])
    root = {"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": huge}}
    (out / "allocation-shape-past-storage.ckpt").write_bytes(ckpt_bytes(root, [storage]))
    short = ShortRebuild(storage, 0, [18], [1])
    root = {"state_dict": {"model.diffusion_model.out.0.bias": short}}
    (out / "panic-short-tensor-rebuild.ckpt").write_bytes(ckpt_bytes(root, [storage]))

    out = OUT / "safetensors" / "regressions"
    out.mkdir(parents=True, exist_ok=True)
    # A name with a newline and a terminal escape: errors naming the tensor ran over two lines
    # (the ckpt fuzzer found it in a pickle; the safetensors mutator did not write one then).
    tensors = [("w\n\x1b[2J", "F32", [2], [1.0, 2.0])]
    (out / "two-line-error-newline-in-name.safetensors").write_bytes(safetensors_bytes(tensors))

    out = OUT / "lora" / "regressions"
    out.mkdir(parents=True, exist_ok=True)
    # An 8192x8192 update from 64 KB of rank-1 factors, for conv_in (16x4x3x3): a 256 MB
    # product before the shape was checked.
    side = 8192
    tensors = [
        ("lora_unet_conv_in.lora_down.weight", "F32", [1, side], [0.0] * side),
        ("lora_unet_conv_in.lora_up.weight", "F32", [side, 1], [0.0] * side),
    ]
    (out / "allocation-huge-update.safetensors").write_bytes(safetensors_bytes(tensors))


if __name__ == "__main__":
    write_safetensors()
    write_ckpt()
    write_lora()
    write_handmade_regressions()
    for path in sorted(OUT.rglob("*.*")):
        print(f"{path.relative_to(ROOT)}: {path.stat().st_size} bytes")
