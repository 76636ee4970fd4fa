#!/usr/bin/env python3
"""What sd-parsers (a third-party reader of AUTOMATIC1111 PNGs, pip `sd-parsers`) reads from a
hires-fix PNG made by sdfix, for tests/hires.rs. Run by hand after `cargo build --release`:

    .venv-oracle/bin/python scripts/hires_infotext_check.py

Makes the PNG with the arguments below (the same as the test's), parses it with
`sd_parsers.ParserManager`, checks that it is read as an AUTOMATIC1111 picture with the hires
fields, and writes what it read to tests/fixtures/refs/hires_sd_parsers.json. The hires prompt
holds no comma or colon: sd-parsers 0.6 splits a quoted value at its commas (`Hires prompt:
"a, b"` reads as `"a` and a stray field), where A1111's own `parse_generation_parameters` keeps it
whole. The Rust test makes
the same PNG and checks that every field sd-parsers read is in its `parameters` text unchanged.
"""

import importlib.metadata
import json
import pathlib
import subprocess
import tempfile

from sd_parsers import ParserManager
from sd_parsers.data import Generators

ROOT = pathlib.Path(__file__).resolve().parent.parent
ARGS = [
    "generate", "--model", str(ROOT / "tests/fixtures/tiny-sd"), "--prompt", "a red circle", "--negative-prompt",
    "blurry", "--steps", "6", "--width", "16", "--height", "16", "--seed", "3", "--hires-scale", "2",
    "--hires-steps", "3", "--hires-upscaler", "latent-bicubic-antialiased", "--hires-sampler", "euler",
    "--hires-prompt", "a red circle in sharp detail", "--hires-negative-prompt", "dark", "--quiet",
]


def main() -> None:
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([str(ROOT / "target/release/sdfix"), *ARGS, "--out-dir", out], check=True)
        png = next(pathlib.Path(out).glob("*.png"))
        info = ParserManager().parse(png)
    assert info is not None and info.generator == Generators.AUTOMATIC1111, info
    sampler = info.samplers[0]
    read = {
        "sd_parsers": importlib.metadata.version("sd-parsers"),
        "args": ARGS[3:],
        "prompt": info.full_prompt,
        "negative_prompt": info.full_negative_prompt,
        "sampler": sampler.name,
        "sampler_parameters": sampler.parameters,
        "model": sampler.model.name if sampler.model else None,
        "metadata": info.metadata,
    }
    for key, value in {"Size": "16x16", "Denoising strength": "0.7", "Hires upscale": "2", "Hires steps": "3",
                       "Hires upscaler": "Latent (bicubic antialiased)", "Hires sampler": "Euler",
                       "Hires prompt": "a red circle in sharp detail", "Hires negative prompt": "dark"}.items():
        assert info.metadata.get(key) == value, (key, info.metadata)
    path = ROOT / "tests/fixtures/refs/hires_sd_parsers.json"
    path.write_text(json.dumps(read, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
