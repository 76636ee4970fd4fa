#!/usr/bin/env python3
"""Reference data for sdfix's prompt language (src/prompt/), for tests/prompt.rs and
tests/prompt_encoding.rs. Run by hand, never in CI:

    .venv-oracle/bin/python scripts/make_prompt_refs.py

A1111 itself is AGPL and not installed, so its behaviour enters here as a re-derivation from the
written spec (/work/shared/research/a1111_prompts_hires_preview.md, section 1), independent of the
Rust port:
- `parse` re-derives `prompt_parser.parse_prompt_attention` with Python's own `re`, on the
  spec's regex (the Rust port scans by hand: this checks the scanner against the regex engine),
  and checks itself on the doctest vectors first;
- `chunk` re-derives `sd_hijack_clip.tokenize_line` (75-token chunks, comma backtrack 20, BREAK,
  EOS padding, then the pad id after the first EOS) on transformers' real CLIPTokenizer, once as
  the fixture ships it (SD 2.x: pad "!", id 0) and once with SD 1.x's pad (<|endoftext|>);
- the emphasis formulas (A1111's `sd_emphasis.py`, ComfyUI's `encode_token_weights`) in numpy on
  fixed tensors, and through transformers' CLIPTextModel of tests/fixtures/tiny-sd on a
  two-chunk weighted prompt.

Writes tests/fixtures/refs/prompt.json and tests/fixtures/refs/prompt_encoding.safetensors.
"""

import json
import pathlib
import re
import struct

import numpy as np
import safetensors.numpy
import torch
import transformers
from transformers import CLIPTextModel, CLIPTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests" / "fixtures" / "tiny-sd"
REFS = ROOT / "tests" / "fixtures" / "refs"

# --- parse_prompt_attention, from the spec's grammar (section 1.1) ---------------------------

ATTENTION = re.compile(
    r"""
\\\(|\\\)|\\\[|\\\]|\\\\|   # escapes
\\|                         # a lone backslash
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|     # weight-close
\)|\]|
[^\\()\[\]:]+|              # plain text
:
""",
    re.X,
)
BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse(text):
    out = []  # [text, weight] pairs
    rounds, squares = [], []

    def scale(start, factor):
        for pair in out[start:]:
            pair[1] *= factor

    for m in ATTENTION.finditer(text):
        s, number = m.group(0), m.group(1)
        if s.startswith("\\"):
            out.append([s[1:], 1.0])
        elif s == "(":
            rounds.append(len(out))
        elif s == "[":
            squares.append(len(out))
        elif number is not None and rounds:
            scale(rounds.pop(), float(number))
        elif s == ")" and rounds:
            scale(rounds.pop(), 1.1)
        elif s == "]" and squares:
            scale(squares.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(BREAK.split(s)):
                if i:
                    out.append(["BREAK", -1])
                out.append([part, 1.0])
    for start in rounds:
        scale(start, 1.1)
    for start in squares:
        scale(start, 1 / 1.1)
    if not out:
        out = [["", 1.0]]
    merged = [out[0]]
    for pair in out[1:]:
        if pair[1] == merged[-1][1]:
            merged[-1][0] += pair[0]
        else:
            merged.append(pair)
    return merged


DOCTESTS = {
    "normal text": [["normal text", 1.0]],
    "an (important) word": [["an ", 1.0], ["important", 1.1], [" word", 1.0]],
    "(unbalanced": [["unbalanced", 1.1]],
    "\\(literal\\]": [["(literal]", 1.0]],
    "(unnecessary)(parens)": [["unnecessaryparens", 1.1]],
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).": [
        ["a ", 1.0],
        ["house", 1.5730000000000004],
        [" ", 1.1],
        ["on", 1.0],
        [" a ", 1.1],
        ["hill", 0.55],
        [", sun, ", 1.1],
        ["sky", 1.4641000000000006],
        [".", 1.1],
    ],
}

PARSE_CASES = list(DOCTESTS) + [
    "",
    "(cat: 1.3 )",
    "[cat:1.3]",
    "((a)",
    "(a:0)",
    "(a:-1)",
    "((a:1.3))",
    "a BREAK b",
    "BREAK a",
    "a BREAK",
    "a BREAK BREAK b",
    "(a BREAK b)",
    "[BREAK]",
    "a,BREAK,b",
    "aBREAK b BREAKs BREAK_ Break",
    "a\\b \\\\ c\\",
    "a) b] c: d",
    "a :1.5 ) b",
    "(a:1.5x)",
    "(a:+.5) (b: -2. ) [(c:2)]",
    "[[a]] [[[b]]] ((((c)))) [(d)]",
    "(((a:1.1):1.1):1.1)",
    "(masterpiece:1.2), (best quality), [[lowres]], 1girl, (red hair:0.8)",
    "(café:1.2) 猫 é BREAK\u3000ü",
    "\\(\\) \\[\\] (a \\(b\\))",
    "[a:b:0.5] [c|d]",
]


def weight_bits(w):
    """The f64's bits, which JSON carries exactly (a float may round on the way)."""
    return struct.unpack("<Q", struct.pack("<d", float(w)))[0]


# --- tokenize_line, from the spec (section 1.2) -----------------------------------------------

CHUNK = 75
BACKTRACK = 20


def chunk(tokenizer, line):
    fragments = parse(line)
    tokenized = tokenizer([t for t, _ in fragments], truncation=False, add_special_tokens=False)["input_ids"]
    comma = tokenizer.get_vocab()[",</w>"]
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks, ids, weights = [], [], []
    state = {"count": 0, "comma": -1}

    def close(is_last):
        nonlocal ids, weights
        state["count"] += len(ids) if is_last else CHUNK
        body = ids + [eos] * (CHUNK - len(ids))
        full = [bos] + body + [eos]
        first_eos = full.index(eos)
        full = full[: first_eos + 1] + [pad] * (len(full) - first_eos - 1)
        chunks.append({"ids": full, "weights": [1.0] + weights + [1.0] * (CHUNK - len(weights)) + [1.0]})
        ids, weights = [], []
        state["comma"] = -1

    for tokens, (text, weight) in zip(tokenized, fragments):
        if text == "BREAK" and weight == -1:
            close(False)
            continue
        for token in tokens:
            if token == comma:
                state["comma"] = len(ids)
            elif len(ids) == CHUNK and state["comma"] != -1 and CHUNK - state["comma"] <= BACKTRACK:
                cut = state["comma"] + 1
                moved_ids, moved_weights = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close(False)
                ids, weights = moved_ids, moved_weights
            if len(ids) == CHUNK:
                close(False)
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close(True)
    return {"prompt": line, "token_count": state["count"], "chunks": chunks}


def comma_at(index, total=100):
    """`total` one-token words with a comma token at chunk index `index`."""
    return " ".join(["cat"] * index) + ", " + " ".join(["dog"] * (total - index))


CHUNK_CASES = [
    "",
    "a red cat",
    " ".join(["cat"] * 75),
    " ".join(["cat"] * 76),
    " ".join(["cat"] * 150),
    " ".join(["cat"] * 151),
    comma_at(54),
    comma_at(55),
    comma_at(56),
    comma_at(74),
    comma_at(75),
    comma_at(76),
    comma_at(55) + ", " + " ".join(["bird"] * 60) + ", " + " ".join(["fish"] * 40),
    "BREAK a red cat",
    "a red cat BREAK",
    "a red cat BREAK a blue dog",
    "a BREAK BREAK b",
    "(a BREAK b)",
    " ".join(["cat"] * 70) + " BREAK dog",
    "foo(bar) foo bar",
    "\\(literal\\) text \\\\ slash",
    "café 猫 ünïcödé",
    "wow!! (great:1.3)",
    "(a, b:1.1), c",
    "masterpiece, (best quality:1.2), [blurry], "
    + ", ".join(f"({w}:1.1)" if i % 3 == 0 else w for i, w in enumerate(
        "a detailed oil painting of an old lighthouse on a rocky cliff above a stormy sea at dusk "
        "with dramatic clouds crashing waves seagulls warm light in the lantern room soft rim "
        "light cinematic composition wide angle lens high dynamic range intricate textures of "
        "weathered stone and peeling paint moss lichen salt spray reflections on wet rocks "
        "distant ship silhouette on the horizon golden hour palette volumetric fog".split()
    )),
]


def sd1_tokenizer():
    """The fixture's vocabulary with SD 1.x's padding (openai/clip-vit-large-patch14 pads with EOS)."""
    return CLIPTokenizer.from_pretrained(MODEL / "tokenizer", pad_token="<|endoftext|>")


# --- emphasis formulas (section 1.3, 1.5) ------------------------------------------------------


def original(z, w):
    w = w.astype(np.float32)[..., None]
    mean = z.mean(dtype=np.float32)
    weighted = z * w
    return weighted * (mean / weighted.mean(dtype=np.float32))


def no_norm(z, w):
    return z * w.astype(np.float32)[..., None]


def comfy(z, w, empty):
    out = z.copy()
    for j, weight in enumerate(w):
        if weight != 1.0:
            out[0, j] = (z[0, j] - empty[0, j]) * np.float32(weight) + empty[0, j]
    return out


def formula_case():
    """Fixed tensors (1, 77, 8) and a weighted chunk's weights, through the three formulas."""
    rng = np.random.default_rng(31)
    z = rng.standard_normal((1, 77, 8)).astype(np.float32)
    empty = rng.standard_normal((1, 77, 8)).astype(np.float32)
    w = np.ones(77)
    w[1:6] = [1.1, 1.21, 1 / 1.1, 1.5730000000000004, 0.0]
    w[6] = -1.1
    return {"z": z, "empty": empty, "weights": w}


def main():
    for prompt, expected in DOCTESTS.items():
        assert parse(prompt) == expected, (prompt, parse(prompt))
    parse_refs = [
        {"prompt": p, "fragments": [[t, w] for t, w in parse(p)], "weight_bits": [weight_bits(w) for _, w in parse(p)]}
        for p in PARSE_CASES
    ]

    sd2 = CLIPTokenizer.from_pretrained(MODEL / "tokenizer")
    sd1 = sd1_tokenizer()
    assert sd2.pad_token_id == 0 and sd1.pad_token_id == sd1.eos_token_id
    chunk_refs = {
        "sd1": [chunk(sd1, line) for line in CHUNK_CASES],
        "sd2": [chunk(sd2, line) for line in CHUNK_CASES],
    }

    formulas = formula_case()
    tensors = {
        "formula.z": formulas["z"],
        "formula.empty": formulas["empty"],
        "formula.original": original(formulas["z"], formulas["weights"]),
        "formula.no_norm": no_norm(formulas["z"], formulas["weights"]),
        "formula.comfy": comfy(formulas["z"], formulas["weights"], formulas["empty"]),
    }

    # A two-chunk weighted prompt through the tiny CLIP, chunk by chunk, as A1111 encodes it.
    model = CLIPTextModel.from_pretrained(MODEL / "text_encoder").eval()
    encode_prompt = ", ".join(["(red:1.3) cat", "[blue] dog", "((green bird))"] * 10) + " BREAK (sun:0.5)"
    encoded = chunk(sd2, encode_prompt)
    assert len(encoded["chunks"]) == 3, len(encoded["chunks"])

    def run(ids):
        with torch.no_grad():
            return model(torch.tensor([ids])).last_hidden_state.numpy()

    empty_z = run(chunk(sd2, "")["chunks"][0]["ids"])
    zs = [run(c["ids"]) for c in encoded["chunks"]]
    weights = [np.array(c["weights"]) for c in encoded["chunks"]]
    tensors["encoding.empty"] = empty_z
    tensors["encoding.original"] = np.concatenate([original(z, w) for z, w in zip(zs, weights)], axis=1)
    tensors["encoding.no_norm"] = np.concatenate([no_norm(z, w) for z, w in zip(zs, weights)], axis=1)
    tensors["encoding.ignore"] = np.concatenate(zs, axis=1)
    tensors["encoding.comfy_formula"] = np.concatenate([comfy(z, w, empty_z) for z, w in zip(zs, weights)], axis=1)

    refs = {
        "generator": "scripts/make_prompt_refs.py",
        "versions": {"transformers": transformers.__version__, "numpy": np.__version__, "torch": torch.__version__},
        "parse": parse_refs,
        "chunks": chunk_refs,
        "formula_weights": formulas["weights"].tolist(),
        "encoding_prompt": encode_prompt,
    }
    REFS.mkdir(parents=True, exist_ok=True)
    # One case per line: readable diffs, no 77-line id lists.
    lines = ["{"]
    items = list(refs.items())
    for i, (key, value) in enumerate(items):
        end = "," if i + 1 < len(items) else ""
        if key == "parse":
            body = ",\n".join("  " + json.dumps(case, ensure_ascii=False) for case in value)
            lines.append(f'"{key}": [\n{body}\n]{end}')
        elif key == "chunks":
            parts = []
            for family, cases in value.items():
                body = ",\n".join("  " + json.dumps(case, ensure_ascii=False) for case in cases)
                parts.append(f'"{family}": [\n{body}\n]')
            lines.append(f'"{key}": {{\n' + ",\n".join(parts) + f"\n}}{end}")
        else:
            lines.append(f'"{key}": {json.dumps(value, ensure_ascii=False)}{end}')
    lines.append("}")
    (REFS / "prompt.json").write_text("\n".join(lines) + "\n", encoding="utf-8")
    safetensors.numpy.save_file(
        {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
        REFS / "prompt_encoding.safetensors",
        metadata={"generator": "scripts/make_prompt_refs.py", "transformers": transformers.__version__},
    )
    print(f"wrote {REFS / 'prompt.json'} and {REFS / 'prompt_encoding.safetensors'}")


if __name__ == "__main__":
    main()
