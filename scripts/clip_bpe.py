"""CLIP's BPE tokenizer files, as SD 2.x ships them (vocab.json + merges.txt), built from the bpe
file open-clip-torch includes. Shared by make_fixtures.py and train_demo.py."""

import gzip
import json
import pathlib

import open_clip


def write_tokenizer(folder: pathlib.Path) -> None:
    """The real 49408-token CLIP vocabulary and merges; SD 2.x's special tokens (pad "!")."""
    bpe_path = pathlib.Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_tokens = list(open_clip.tokenizer.bytes_to_unicode().values())
    vocab = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "!",  # SD 2.x pads with "!" (id 0); SD 1.x with <|endoftext|>
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = dict(special, model_max_length=77, do_lower_case=True, tokenizer_class="CLIPTokenizer")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
