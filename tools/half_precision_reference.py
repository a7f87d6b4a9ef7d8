#!/usr/bin/env python3
"""How far PyTorch's own half precision moves the tiny pipeline fixtures.

The f16 bounds in tests/pipeline.rs are judged against this: diffusers'
StableDiffusion3Pipeline runs the fixture request (same init latents, same
prompts) in float16 and bfloat16, and the relative error of its final latents
against the fp32 reference stored in tests/fixtures/pipeline/*/pipeline_io
is printed. CPU is enough:

    python3 -m venv .venv
    .venv/bin/pip install torch diffusers transformers sentencepiece protobuf
    .venv/bin/python tools/half_precision_reference.py
"""

import json
import os
import shutil
import tempfile

import torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")


def folder(variant, tmp):
    """A complete diffusers folder, assembled as the Rust tests do."""
    d = os.path.join(tmp, variant)
    shutil.copytree(os.path.join(ROOT, "pipeline", variant), d)
    for sub in ["text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"]:
        shutil.copytree(os.path.join(ROOT, "text", sub), os.path.join(d, sub))
    shutil.copytree(os.path.join(ROOT, "vae", "vae"), os.path.join(d, "vae"))
    return d


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def main():
    req = json.load(open(os.path.join(ROOT, "pipeline", "request.json")))
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ["sd3", "sd35m", "sd35l"]:
            d = folder(variant, tmp)
            io = load_file(os.path.join(d, "pipeline_io.safetensors"))
            for dtype in [torch.float16, torch.bfloat16]:
                pipe = StableDiffusion3Pipeline.from_pretrained(d, torch_dtype=dtype)
                for key in ["t5", "no_t5"]:
                    if key == "no_t5":
                        pipe.text_encoder_3 = None
                        pipe.tokenizer_3 = None
                    with torch.no_grad():
                        out = pipe(prompt=req["prompt"], negative_prompt=req["negative_prompt"],
                                   num_inference_steps=req["steps"], guidance_scale=req["cfg"],
                                   height=req["height"], width=req["width"],
                                   latents=io["init_latents"].to(dtype),
                                   max_sequence_length=req["max_t5_tokens"], output_type="latent").images
                    print(f"{variant} {key} {str(dtype).split('.')[-1]}: final latents rel err "
                          f"{rel(out.float(), io[key + '.latents']):.2e}")


if __name__ == "__main__":
    main()
