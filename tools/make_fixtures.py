#!/usr/bin/env python3
"""Builds the tiny random-weight reference fixtures in tests/fixtures/.

Regenerate (CPU is enough, a few seconds):

    python3 -m venv .venv
    .venv/bin/pip install torch diffusers transformers safetensors
    .venv/bin/python tools/make_fixtures.py

For each MMDiT variant it builds a tiny diffusers SD3Transformer2DModel with
EVERY parameter randomised (diffusers' own init zeroes the adaLN and final
layers, which would hide bugs), rounds each tensor to the dtype it will be
stored in, and writes:

- tests/fixtures/mmdit/<variant>/transformer/  diffusers folder (config.json +
  safetensors, sharded with an index json for one variant)
- tests/fixtures/mmdit/<variant>.safetensors   Stability single-file layout
  (model.diffusion_model.*, fused qkv, (shift, scale) 2-chunk modulations),
  checked here by converting it back with diffusers' own converter
- tests/fixtures/mmdit/<variant>_io.safetensors inputs and the f32 reference
  output of two forward passes (square and non-square latents, batch 2,
  different timesteps per batch entry)
"""

import json
import os
import shutil

import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")

# (name, config, matrix precision, single-file matrix dtype, diffusers matrix
#  dtype, vector dtype, number of shards or None). Matrices are rounded to
# their precision first, so both layouts hold exactly the same values.
VARIANTS = [
    ("sd3", dict(num_layers=2, num_attention_heads=1), torch.float32, torch.float32, torch.float32, torch.float16, None),
    (
        "sd35m",
        dict(num_layers=2, num_attention_heads=2, qk_norm="rms_norm", dual_attention_layers=(0,)),
        torch.float8_e4m3fn,
        torch.float8_e4m3fn,
        torch.float8_e4m3fn,
        torch.bfloat16,
        3,
    ),
    (
        "sd35l",
        dict(num_layers=2, num_attention_heads=1, qk_norm="rms_norm"),
        torch.float16,
        torch.float16,
        torch.float16,
        torch.float32,
        None,
    ),
]

COMMON = dict(
    sample_size=16,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    attention_head_dim=64,
    joint_attention_dim=96,
    pooled_projection_dim=64,
    pos_embed_max_size=16,
)


def randomise(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def round_to_storage(model, mat_dtype, vec_dtype):
    """Rounds every tensor to its storage dtype (in place, kept in f32)."""
    with torch.no_grad():
        for _, t in list(model.named_parameters()) + list(model.named_buffers()):
            dt = mat_dtype if t.ndim >= 2 else vec_dtype
            t.copy_(t.to(dt).to(torch.float32))


def storage_dtype(t, mat_dtype, vec_dtype):
    return mat_dtype if t.ndim >= 2 else vec_dtype


def write_diffusers_weights(folder, tensors, shards):
    stem = "diffusion_pytorch_model"
    if not shards:
        save_file(tensors, os.path.join(folder, f"{stem}.safetensors"))
        return
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, os.path.join(folder, fname))
        weight_map.update({k: fname for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(folder, f"{stem}.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)


def to_single_file(sd, num_layers, dim):
    """Inverse of diffusers' convert_sd3_transformer_checkpoint_to_diffusers."""
    def swap(w):
        a, b = w.chunk(2, dim=0)
        return torch.cat([b, a], dim=0)

    out = {
        "pos_embed": sd["pos_embed.pos_embed"],
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "context_embedder.weight": sd["context_embedder.weight"],
        "context_embedder.bias": sd["context_embedder.bias"],
        "final_layer.linear.weight": sd["proj_out.weight"],
        "final_layer.linear.bias": sd["proj_out.bias"],
        "final_layer.adaLN_modulation.1.weight": swap(sd["norm_out.linear.weight"]),
        "final_layer.adaLN_modulation.1.bias": swap(sd["norm_out.linear.bias"]),
    }
    for ours, theirs in [("t_embedder", "timestep_embedder"), ("y_embedder", "text_embedder")]:
        for i, j in [(0, 1), (2, 2)]:
            for p in ["weight", "bias"]:
                out[f"{ours}.mlp.{i}.{p}"] = sd[f"time_text_embed.{theirs}.linear_{j}.{p}"]
    for i in range(num_layers):
        d, s = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        last = i == num_layers - 1
        for p in ["weight", "bias"]:
            out[f"{s}.x_block.attn.qkv.{p}"] = torch.cat([sd[f"{d}.attn.to_{c}.{p}"] for c in "qkv"])
            out[f"{s}.context_block.attn.qkv.{p}"] = torch.cat([sd[f"{d}.attn.add_{c}_proj.{p}"] for c in "qkv"])
            out[f"{s}.x_block.attn.proj.{p}"] = sd[f"{d}.attn.to_out.0.{p}"]
            out[f"{s}.x_block.adaLN_modulation.1.{p}"] = sd[f"{d}.norm1.linear.{p}"]
            out[f"{s}.x_block.mlp.fc1.{p}"] = sd[f"{d}.ff.net.0.proj.{p}"]
            out[f"{s}.x_block.mlp.fc2.{p}"] = sd[f"{d}.ff.net.2.{p}"]
            ctx_mod = sd[f"{d}.norm1_context.linear.{p}"]
            out[f"{s}.context_block.adaLN_modulation.1.{p}"] = swap(ctx_mod) if last else ctx_mod
            if not last:
                out[f"{s}.context_block.attn.proj.{p}"] = sd[f"{d}.attn.to_add_out.{p}"]
                out[f"{s}.context_block.mlp.fc1.{p}"] = sd[f"{d}.ff_context.net.0.proj.{p}"]
                out[f"{s}.context_block.mlp.fc2.{p}"] = sd[f"{d}.ff_context.net.2.{p}"]
            if f"{d}.attn2.to_q.{p}" in sd:
                out[f"{s}.x_block.attn2.qkv.{p}"] = torch.cat([sd[f"{d}.attn2.to_{c}.{p}"] for c in "qkv"])
                out[f"{s}.x_block.attn2.proj.{p}"] = sd[f"{d}.attn2.to_out.0.{p}"]
        if f"{d}.attn.norm_q.weight" in sd:
            out[f"{s}.x_block.attn.ln_q.weight"] = sd[f"{d}.attn.norm_q.weight"]
            out[f"{s}.x_block.attn.ln_k.weight"] = sd[f"{d}.attn.norm_k.weight"]
            out[f"{s}.context_block.attn.ln_q.weight"] = sd[f"{d}.attn.norm_added_q.weight"]
            out[f"{s}.context_block.attn.ln_k.weight"] = sd[f"{d}.attn.norm_added_k.weight"]
        if f"{d}.attn2.norm_q.weight" in sd:
            out[f"{s}.x_block.attn2.ln_q.weight"] = sd[f"{d}.attn2.norm_q.weight"]
            out[f"{s}.x_block.attn2.ln_k.weight"] = sd[f"{d}.attn2.norm_k.weight"]
    return out


def main():
    base = os.path.join(ROOT, "mmdit")
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    for vi, (name, cfg, mat_dt, single_dt, folder_dt, vec_dt, shard) in enumerate(VARIANTS):
        gen = torch.Generator().manual_seed(1000 + vi)
        # As in the real configs, the context embedder maps to the inner width.
        inner = cfg["num_attention_heads"] * COMMON["attention_head_dim"]
        model = SD3Transformer2DModel(**COMMON, **cfg, caption_projection_dim=inner).eval()
        randomise(model, gen)
        round_to_storage(model, mat_dt, vec_dt)
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}

        # Diffusers folder: config.json plus safetensors in the storage dtypes,
        # sharded with an index json like large real checkpoints.
        folder = os.path.join(base, name, "transformer")
        os.makedirs(folder)
        model.save_config(folder)
        stored = {k: v.to(storage_dtype(v, folder_dt, vec_dt)).contiguous() for k, v in sd.items()}
        write_diffusers_weights(folder, stored, shard)
        loaded = SD3Transformer2DModel.from_pretrained(folder, torch_dtype=torch.float32)
        for k, v in loaded.state_dict().items():
            assert torch.equal(v, sd[k]), k

        # Single file, verified with diffusers' own converter.
        single = to_single_file(sd, cfg["num_layers"], model.inner_dim)
        back = convert_sd3_transformer_checkpoint_to_diffusers(dict(single))
        assert set(back) == set(sd), sorted(set(back) ^ set(sd))
        for k in sd:
            assert torch.equal(back[k], sd[k]), k
        single = {
            "model.diffusion_model." + k: v.to(storage_dtype(v, single_dt, vec_dt)).contiguous() for k, v in single.items()
        }
        save_file(single, os.path.join(base, f"{name}.safetensors"))

        # Reference forward passes in f32.
        io = {}
        for ci, (h, w, t) in enumerate([(8, 8, [937.5, 3.25]), (6, 10, [500.0, 126.0625])]):
            x = torch.randn(2, 16, h, w, generator=gen)
            ctx = torch.randn(2, 7, COMMON["joint_attention_dim"], generator=gen)
            pooled = torch.randn(2, COMMON["pooled_projection_dim"], generator=gen)
            ts = torch.tensor(t, dtype=torch.float32)
            with torch.no_grad():
                out = model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=ts).sample
            assert torch.isfinite(out).all() and out.std() > 0.1
            io.update({f"case{ci}.x": x, f"case{ci}.context": ctx, f"case{ci}.pooled": pooled, f"case{ci}.t": ts, f"case{ci}.out": out})
        save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(base, f"{name}_io.safetensors"))
        print(name, "params", sum(p.numel() for p in model.parameters()))


# ---------------------------------------------------------------------------
# VAE: a tiny 16-channel AutoencoderKL (two levels of 32 and 64 channels, so a
# 1×1 shortcut, one downsampler and one upsampler are exercised).

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=32,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=1.5305,
    shift_factor=0.0609,
)


def vae_to_ldm(sd, levels):
    """Inverse of diffusers' convert_ldm_vae_checkpoint (diffusers → LDM names)."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        coder, rest = parts[0], parts[1:]
        if rest[0] == "conv_norm_out":
            name = "norm_out." + ".".join(rest[1:])
        elif rest[0] == "down_blocks" and rest[2] == "resnets":
            name = f"down.{rest[1]}.block.{rest[3]}." + ".".join(rest[4:]).replace("conv_shortcut", "nin_shortcut")
        elif rest[0] == "down_blocks":
            name = f"down.{rest[1]}.downsample." + ".".join(rest[4:])
        elif rest[0] == "up_blocks" and rest[2] == "resnets":
            b = levels - 1 - int(rest[1])
            name = f"up.{b}.block.{rest[3]}." + ".".join(rest[4:]).replace("conv_shortcut", "nin_shortcut")
        elif rest[0] == "up_blocks":
            b = levels - 1 - int(rest[1])
            name = f"up.{b}.upsample." + ".".join(rest[4:])
        elif rest[:2] == ["mid_block", "resnets"]:
            name = f"mid.block_{int(rest[2]) + 1}." + ".".join(rest[3:]).replace("conv_shortcut", "nin_shortcut")
        elif rest[:2] == ["mid_block", "attentions"]:
            what = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[rest[3]]
            name = f"mid.attn_1.{what}.{rest[-1]}"
            if v.ndim == 2:  # LDM stores these projections as 1×1 convs
                v = v[:, :, None, None]
        else:
            name = ".".join(rest)
        out[f"{coder}.{name}"] = v
    return out


def make_vae():
    from diffusers import AutoencoderKL
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    base = os.path.join(ROOT, "vae")
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    gen = torch.Generator().manual_seed(2000)
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    randomise(vae, gen)
    # fp8-exact values: stored as f16 in the folder and fp8 in the single file.
    round_to_storage(vae, torch.float8_e4m3fn, torch.float32)
    sd = {k: v.detach().clone() for k, v in vae.state_dict().items()}
    folder = os.path.join(base, "vae")
    os.makedirs(folder)
    vae.save_config(folder)
    write_diffusers_weights(folder, {k: v.to(storage_dtype(v, torch.float16, torch.float32)).contiguous() for k, v in sd.items()}, None)
    loaded = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k

    ldm = vae_to_ldm(sd, len(VAE_CONFIG["block_out_channels"]))
    back = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in ldm.items()}, dict(VAE_CONFIG))
    assert set(back) == set(sd), sorted(set(back) ^ set(sd))
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    single = {
        "first_stage_model." + k: v.to(storage_dtype(v, torch.float8_e4m3fn, torch.float32)).contiguous()
        for k, v in ldm.items()
    }
    save_file(single, os.path.join(base, "vae.safetensors"))

    proc = VaeImageProcessor(vae_scale_factor=2)
    latents = torch.randn(2, 16, 5, 7, generator=gen)
    image = torch.rand(1, 3, 12, 10, generator=gen) * 2 - 1
    with torch.no_grad():
        # As the SD3 pipeline decodes its output latents.
        z = latents / VAE_CONFIG["scaling_factor"] + VAE_CONFIG["shift_factor"]
        decoded = vae.decode(z).sample
        mean = vae.encode(image).latent_dist.mean
    encoded = (mean - VAE_CONFIG["shift_factor"]) * VAE_CONFIG["scaling_factor"]
    rgb = proc.postprocess(decoded, output_type="np")  # float in [0, 1], HWC
    rgb8 = torch.from_numpy((rgb * 255).round().astype("uint8"))
    assert torch.isfinite(decoded).all() and decoded.std() > 0.1
    io = {"latents": latents, "decoded": decoded, "rgb8": rgb8, "image": image, "encoded": encoded}
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(base, "vae_io.safetensors"))
    print("vae params", sum(p.numel() for p in vae.parameters()))





# ---------------------------------------------------------------------------
# Text encoders: tiny CLIP-L (quick-GELU), CLIP-G (GELU) and T5 encoder with
# real-format tokenizers, and diffusers' encode_prompt as the reference.
#
# CLIP BPE: the real vocabulary ships in open_clip_torch's wheel
# (open_clip/bpe_simple_vocab_16e6.txt.gz); pass its path as CLIP_BPE=... . The
# fixture keeps the first CLIP_MERGES merges in the real vocab.json/merges.txt
# format so the embedding tables stay small. T5: a SentencePiece unigram model
# trained here on a small corpus (pad 0, eos 1, unk 2).

CLIP_MERGES = 1000
T5_TOKENS = 32
PROMPTS = [
    "a photo of a cat",
    "",
    "A RED Fox, jumping!!!  over   the moon.",
    "Ünïcödé façade café naïve",
    "日本語 中文 한국어",
    "emoji 🦊🚀 ok",
    '"quoted!" text! !! ?!',
    "  leading and trailing spaces  ",
    "numbers 12345 and 3.14, don't stop",
    " ".join(["a very long prompt that keeps going"] * 12),
]
EMBED_PROMPTS = [0, 1, 9]


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_clip_vocab(folder, bpe_path):
    import gzip

    merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = merges[1 : 1 + CLIP_MERGES]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return len(vocab)


def make_text():
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                              T5EncoderModel, T5Tokenizer)
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    import tempfile

    base = os.path.join(ROOT, "text")
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    bpe = os.environ.get("CLIP_BPE", "/tmp/bpe.txt.gz")

    # Tokenizers: CLIP-L as tokenizer.json, CLIP-G as vocab.json + merges.txt +
    # tokenizer_config.json (as many real diffusers folders ship it), pad "!".
    tmp = tempfile.mkdtemp()
    n_vocab = write_clip_vocab(tmp, bpe)
    tok_l = CLIPTokenizer(vocab=os.path.join(tmp, "vocab.json"), merges=os.path.join(tmp, "merges.txt"), model_max_length=77)
    tok_l.save_pretrained(os.path.join(base, "tokenizer"))
    tok_g = CLIPTokenizer(vocab=os.path.join(tmp, "vocab.json"), merges=os.path.join(tmp, "merges.txt"), pad_token="!",
                          model_max_length=77)
    g_dir = os.path.join(base, "tokenizer_2")
    tok_g.save_pretrained(g_dir)
    os.remove(os.path.join(g_dir, "tokenizer.json"))
    write_clip_vocab(g_dir, bpe)
    # The config as the real SD3 tokenizer_2 ships it: "!" (id 0) is a registered
    # special token, so "!" is split out of the text before BPE.
    special = lambda t: {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": True}
    with open(os.path.join(g_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"add_prefix_space": False,
                   "added_tokens_decoder": {"0": special("!"), str(n_vocab - 2): special("<|startoftext|>"),
                                            str(n_vocab - 1): special("<|endoftext|>")},
                   "bos_token": "<|startoftext|>", "clean_up_tokenization_spaces": True, "do_lower_case": True,
                   "eos_token": "<|endoftext|>", "errors": "replace", "model_max_length": 77, "pad_token": "!",
                   "tokenizer_class": "CLIPTokenizer", "unk_token": "<|endoftext|>"}, f, indent=2)
    tok_l = CLIPTokenizer.from_pretrained(os.path.join(base, "tokenizer"))
    tok_g = CLIPTokenizer.from_pretrained(g_dir)
    assert tok_g.pad_token_id == 0 and tok_l.pad_token_id == n_vocab - 1
    # The trap: CLIP-G splits "!" out before BPE, so '"!' tokenizes differently.
    assert tok_l('"!').input_ids[1:3] == [1, 256] and tok_g('"!').input_ids[1:3] == [257, 0]

    corpus = os.path.join(tmp, "corpus.txt")
    lines = ["a photo of a cat sitting on a red chair", "the quick brown fox jumps over the lazy dog",
             "an astronaut riding a horse on the moon, highly detailed", "numbers 12345 and symbols !@#$%^&*()",
             "UPPER case and lower case words, don't stop", "a very long prompt that keeps going"]
    with open(corpus, "w") as f:
        f.write("\n".join(lines * 40))
    spm.SentencePieceTrainer.train(input=corpus, model_prefix=os.path.join(tmp, "sp"), vocab_size=96,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    proto = pb.ModelProto()
    proto.ParseFromString(open(os.path.join(tmp, "sp.model"), "rb").read())
    pieces = [(p.piece, p.score) for p in proto.pieces]
    tok_t5 = T5Tokenizer(vocab=pieces, extra_ids=0, _spm_precompiled_charsmap=proto.normalizer_spec.precompiled_charsmap,
                         model_max_length=512)
    tok_t5.save_pretrained(os.path.join(base, "tokenizer_3"))
    tok_t5 = T5Tokenizer.from_pretrained(os.path.join(base, "tokenizer_3"))
    assert tok_t5("a cat").input_ids[-1] == 1

    gen = torch.Generator().manual_seed(3000)
    common = dict(vocab_size=n_vocab, max_position_embeddings=77, bos_token_id=n_vocab - 2, eos_token_id=2,
                  pad_token_id=1, projection_dim=32, num_hidden_layers=2)
    clip_l = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=64, intermediate_size=128, num_attention_heads=1,
                                                        hidden_act="quick_gelu", **common)).eval()
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=128, intermediate_size=256, num_attention_heads=2,
                                                        hidden_act="gelu", **common)).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok_t5), d_model=208, d_kv=64, num_heads=2, d_ff=128, num_layers=2,
                                 feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                                 relative_attention_max_distance=128, dropout_rate=0.0)).eval()
    # (model, folder, matrix dtype, vector dtype)
    encoders = [(clip_l, "text_encoder", torch.float16, torch.float32),
                (clip_g, "text_encoder_2", torch.bfloat16, torch.bfloat16),
                (t5, "text_encoder_3", torch.float8_e4m3fn, torch.float16)]
    for model, folder, mat_dt, vec_dt in encoders:
        randomise(model, gen)
        round_to_storage(model, mat_dt, vec_dt)
        path = os.path.join(base, folder)
        os.makedirs(path)
        model.config.save_pretrained(path)
        sd = {k: v.to(storage_dtype(v, mat_dt, vec_dt)).contiguous() for k, v in model.state_dict().items()}
        if model is t5:
            # T5EncoderModel ties encoder.embed_tokens to shared; files store `shared.weight` once.
            sd.pop("encoder.embed_tokens.weight", None)
        save_file(sd, os.path.join(path, "model.safetensors"))

    transformer = SD3Transformer2DModel(**dict(COMMON, joint_attention_dim=208, pooled_projection_dim=64),
                                        num_layers=1, num_attention_heads=1, caption_projection_dim=64)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=AutoencoderKL(**VAE_CONFIG), text_encoder=clip_l, tokenizer=tok_l,
                                    text_encoder_2=clip_g, tokenizer_2=tok_g, text_encoder_3=t5, tokenizer_3=tok_t5)

    def ids(tok, n):
        return torch.tensor([tok(p, padding="max_length", max_length=n, truncation=True).input_ids for p in PROMPTS],
                            dtype=torch.int32)

    out = {"ids.clip_l": ids(tok_l, 77), "ids.clip_g": ids(tok_g, 77), "ids.t5": ids(tok_t5, T5_TOKENS)}
    sel = [PROMPTS[i] for i in EMBED_PROMPTS]
    with torch.no_grad():
        emb, _, pooled, _ = pipe.encode_prompt(sel, sel, sel, do_classifier_free_guidance=False, max_sequence_length=T5_TOKENS)
        out["t5.prompt_embeds"], out["t5.pooled"] = emb, pooled
        pipe.text_encoder_3, pipe.tokenizer_3 = None, None
        emb, _, pooled, _ = pipe.encode_prompt(sel, sel, sel, do_classifier_free_guidance=False, max_sequence_length=T5_TOKENS)
        out["no_t5.prompt_embeds"], out["no_t5.pooled"] = emb, pooled
    assert torch.isfinite(out["t5.prompt_embeds"]).all() and out["t5.prompt_embeds"][:, 77:].std() > 0.1
    # T5's relative-position buckets for offsets -300..300 (exact f32 behaviour matters at bucket edges).
    from transformers.models.t5.modeling_t5 import T5Attention
    rel = torch.arange(-300, 301)
    out["t5.buckets"] = T5Attention._relative_position_bucket(rel, True, 32, 128).to(torch.int32)
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(base, "text_io.safetensors"))
    with open(os.path.join(base, "prompts.json"), "w") as f:
        json.dump({"prompts": PROMPTS, "embed_prompts": EMBED_PROMPTS, "t5_tokens": T5_TOKENS}, f, ensure_ascii=False, indent=1)
    print("text params", sum(p.numel() for m in (clip_l, clip_g, t5) for p in m.parameters()))


# ---------------------------------------------------------------------------
# End-to-end: a tiny StableDiffusion3Pipeline per MMDiT variant, built from
# the text encoders and VAE above and a new tiny transformer whose context
# width is T5's (208). Only the transformer, scheduler config and
# model_index.json are stored per variant; tests assemble the full diffusers
# folder from tests/fixtures/text and tests/fixtures/vae.

PIPE_VARIANTS = [
    ("sd3", dict(num_layers=2)),
    ("sd35m", dict(num_layers=2, qk_norm="rms_norm", dual_attention_layers=(0,))),
    ("sd35l", dict(num_layers=2, qk_norm="rms_norm")),
]
PIPE_PROMPT = "a photo of a cat"
PIPE_NEGATIVE = "blurry, low quality!"


def make_pipelines():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer

    text = os.path.join(ROOT, "text")
    base = os.path.join(ROOT, "pipeline")
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    f32 = dict(torch_dtype=torch.float32)
    parts = dict(
        text_encoder=CLIPTextModelWithProjection.from_pretrained(os.path.join(text, "text_encoder"), **f32),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(os.path.join(text, "text_encoder_2"), **f32),
        text_encoder_3=T5EncoderModel.from_pretrained(os.path.join(text, "text_encoder_3"), **f32),
        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(text, "tokenizer")),
        tokenizer_2=CLIPTokenizer.from_pretrained(os.path.join(text, "tokenizer_2")),
        tokenizer_3=T5Tokenizer.from_pretrained(os.path.join(text, "tokenizer_3")),
        vae=AutoencoderKL.from_pretrained(os.path.join(ROOT, "vae", "vae"), **f32),
    )
    for vi, (name, cfg) in enumerate(PIPE_VARIANTS):
        gen = torch.Generator().manual_seed(4000 + vi)
        transformer = SD3Transformer2DModel(**dict(COMMON, joint_attention_dim=208, pooled_projection_dim=64),
                                            num_attention_heads=1, caption_projection_dim=64, **cfg).eval()
        randomise(transformer, gen)
        round_to_storage(transformer, torch.bfloat16, torch.float32)
        folder = os.path.join(base, name)
        tdir = os.path.join(folder, "transformer")
        os.makedirs(tdir)
        transformer.save_config(tdir)
        sd = {k: v.to(storage_dtype(v, torch.bfloat16, torch.float32)).contiguous() for k, v in transformer.state_dict().items()}
        write_diffusers_weights(tdir, sd, None)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        scheduler.save_config(os.path.join(folder, "scheduler"))
        pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, **parts)
        pipe.save_config(folder)  # model_index.json
        h, w = 6, 10  # latent size; the tiny VAE upsamples 2x
        latents = torch.randn(1, 16, h, w, generator=gen)
        io = {"init_latents": latents}
        for key, enc3 in [("t5", parts["text_encoder_3"]), ("no_t5", None)]:
            pipe.text_encoder_3 = enc3
            pipe.tokenizer_3 = parts["tokenizer_3"] if enc3 is not None else None
            args = dict(prompt=PIPE_PROMPT, negative_prompt=PIPE_NEGATIVE, num_inference_steps=4, guidance_scale=5.0,
                        height=h * 2, width=w * 2, latents=latents.clone(), max_sequence_length=32)
            with torch.no_grad():
                out_latents = pipe(**args, output_type="latent").images
                image = pipe(**args, output_type="np").images
            io[f"{key}.latents"] = out_latents
            io[f"{key}.rgb8"] = torch.from_numpy((image * 255).round().astype("uint8"))
            assert torch.isfinite(out_latents).all()
            if key == "t5" and name == "sd35m":
                # Skip-layer guidance, on steps 1 and 2 of 4 (i < 0.6 · 4).
                with torch.no_grad():
                    io["slg.latents"] = pipe(**args, output_type="latent", skip_guidance_layers=[1],
                                             skip_layer_guidance_stop=0.6).images
        save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(folder, "pipeline_io.safetensors"))
        print(name, "pipeline transformer params", sum(p.numel() for p in transformer.parameters()))
    with open(os.path.join(base, "request.json"), "w") as f:
        json.dump({"prompt": PIPE_PROMPT, "negative_prompt": PIPE_NEGATIVE, "steps": 4, "cfg": 5.0,
                   "height": 12, "width": 20, "max_t5_tokens": 32}, f, indent=1)


RNG_CASES = [(0, 1), (42, 7), (42, 15), (42, 16), (7, 17), (123, 33), (2**40 + 5, 40), (2024, 16 * 6 * 10)]


def make_stream():
    """A deeper transformer for the pipeline's streaming test (tests/stream.rs):
    SD3.5-medium-like, 9 blocks, the first four with dual attention, so that
    each block layout has enough blocks for two slots to take turns. Only its
    folder is written; the test puts it into a copy of the sd3 pipeline."""
    base = os.path.join(ROOT, "stream")
    shutil.rmtree(base, ignore_errors=True)
    gen = torch.Generator().manual_seed(4100)
    transformer = SD3Transformer2DModel(**dict(COMMON, joint_attention_dim=208, pooled_projection_dim=64),
                                        num_attention_heads=1, caption_projection_dim=64, num_layers=9,
                                        qk_norm="rms_norm", dual_attention_layers=(0, 1, 2, 3)).eval()
    randomise(transformer, gen)
    round_to_storage(transformer, torch.bfloat16, torch.float32)
    tdir = os.path.join(base, "transformer")
    os.makedirs(tdir)
    transformer.save_config(tdir)
    sd = {k: v.to(storage_dtype(v, torch.bfloat16, torch.float32)).contiguous() for k, v in transformer.state_dict().items()}
    write_diffusers_weights(tdir, sd, None)


def make_rng():
    """torch.randn on CPU for sizes on both sides of its 16-element boundary."""
    out = {f"randn.{seed}.{n}": torch.randn(n, generator=torch.Generator().manual_seed(seed)) for seed, n in RNG_CASES}
    save_file(out, os.path.join(ROOT, "rng.safetensors"))


IMG2IMG_CASES = [
    # (name, seed, strength, images per prompt)
    ("s0.6", 7, 0.6, 1),
    ("s0.3_batch2", 11, 0.3, 2),
]


def fixture_components():
    """The sd35m pipeline fixture's components, f32, as keyword arguments."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer

    text = os.path.join(ROOT, "text")
    folder = os.path.join(ROOT, "pipeline", "sd35m")
    f32 = dict(torch_dtype=torch.float32)
    return dict(
        transformer=SD3Transformer2DModel.from_pretrained(os.path.join(folder, "transformer"), **f32),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(os.path.join(folder, "scheduler")),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(os.path.join(text, "text_encoder"), **f32),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(os.path.join(text, "text_encoder_2"), **f32),
        text_encoder_3=T5EncoderModel.from_pretrained(os.path.join(text, "text_encoder_3"), **f32),
        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(text, "tokenizer")),
        tokenizer_2=CLIPTokenizer.from_pretrained(os.path.join(text, "tokenizer_2")),
        tokenizer_3=T5Tokenizer.from_pretrained(os.path.join(text, "tokenizer_3")),
        vae=AutoencoderKL.from_pretrained(os.path.join(ROOT, "vae", "vae"), **f32),
    )


def make_img2img():
    """StableDiffusion3Img2ImgPipeline on the sd35m pipeline fixture: the init
    image's latents sampled from the generator, then the noise, f32.

    Writes pipeline/init.png (20x12) and pipeline/sd35m/img2img_io.safetensors
    (final latents per case; seeds and strengths in IMG2IMG_CASES, mirrored in
    tests/pipeline.rs). Run alone with `tools/make_fixtures.py img2img`: it
    reads the fixtures the other steps wrote and changes none of them.
    """
    import numpy as np
    from PIL import Image
    from diffusers import StableDiffusion3Img2ImgPipeline

    base = os.path.join(ROOT, "pipeline")
    h, w = 12, 20
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([(xx * 255 // (w - 1)), (yy * 255 // (h - 1)), ((xx * 37 + yy * 91) % 256)], axis=-1)
    init = Image.fromarray(rgb.astype("uint8"), "RGB")
    init_path = os.path.join(base, "init.png")
    init.save(init_path)
    init = Image.open(init_path).convert("RGB")
    pipe = StableDiffusion3Img2ImgPipeline(**fixture_components())
    io = {}
    for name, seed, strength, per_prompt in IMG2IMG_CASES:
        with torch.no_grad():
            out = pipe(prompt=PIPE_PROMPT, negative_prompt=PIPE_NEGATIVE, image=init, strength=strength,
                       num_inference_steps=4, guidance_scale=5.0, height=h, width=w, max_sequence_length=32,
                       num_images_per_prompt=per_prompt, generator=torch.Generator().manual_seed(seed),
                       output_type="latent").images
        assert torch.isfinite(out).all()
        io[f"{name}.latents"] = out
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(base, "sd35m", "img2img_io.safetensors"))
    print("img2img cases", [c[0] for c in IMG2IMG_CASES])


INPAINT_CASES = [
    # (name, seed, strength, images per prompt, guidance, mask blur radius)
    ("s1.0", 5, 1.0, 1, 5.0, 0),
    ("s0.7_batch2", 9, 0.7, 2, 5.0, 0),
    ("s0.8_blur2_nocfg", 3, 0.8, 1, 1.0, 2),
]


def make_inpaint():
    """StableDiffusion3InpaintPipeline on the sd35m pipeline fixture, f32:
    init.png with pipeline/mask.png (20x12: a white rectangle, a one-pixel
    diagonal and a grey ramp across the threshold). The mask blur goes
    through `mask_processor.blur` (Pillow's GaussianBlur) before the call, as
    diffusers' documentation does it. Writes pipeline/mask.png and
    pipeline/sd35m/inpaint_io.safetensors (final latents per case, the
    binarised latent mask per blur radius). Run alone with
    `tools/make_fixtures.py inpaint`; it needs init.png from the img2img step.
    """
    import numpy as np
    from PIL import Image
    from diffusers import StableDiffusion3InpaintPipeline

    base = os.path.join(ROOT, "pipeline")
    h, w = 12, 20
    m = np.zeros((h, w), dtype=np.uint8)
    m[2:9, 11:18] = 255
    for i in range(h):
        m[i, i] = 255
    m[10, :] = np.linspace(0, 255, w).astype(np.uint8)
    mask_path = os.path.join(base, "mask.png")
    Image.fromarray(m, "L").convert("RGB").save(mask_path)
    init = Image.open(os.path.join(base, "init.png")).convert("RGB")
    mask = Image.open(mask_path)
    pipe = StableDiffusion3InpaintPipeline(**fixture_components())
    io = {}
    for name, seed, strength, per_prompt, cfg, blur in INPAINT_CASES:
        mask_in = pipe.mask_processor.blur(mask, blur_factor=blur) if blur else mask
        with torch.no_grad():
            out = pipe(prompt=PIPE_PROMPT, negative_prompt=PIPE_NEGATIVE, image=init, mask_image=mask_in,
                       strength=strength, num_inference_steps=4, guidance_scale=cfg, height=h, width=w,
                       max_sequence_length=32, num_images_per_prompt=per_prompt,
                       generator=torch.Generator().manual_seed(seed), output_type="latent").images
        assert torch.isfinite(out).all()
        io[f"{name}.latents"] = out
        pre = pipe.mask_processor.preprocess(mask_in, height=h, width=w)
        lat = torch.nn.functional.interpolate(pre, size=(h // pipe.vae_scale_factor, w // pipe.vae_scale_factor))
        io[f"mask.blur{blur}"] = lat[0, 0].contiguous()
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(base, "sd35m", "inpaint_io.safetensors"))
    print("inpaint cases", [c[0] for c in INPAINT_CASES])


BLUR_CASES = [
    # (width, height, pattern, radii)
    (1, 7, "noise", [0.5, 2]),
    (5, 3, "noise", [1, 3.7]),
    (37, 29, "noise", [0.25, 1.5, 4, 10]),
    (37, 29, "blocks", [0.5, 2, 7.3, 40]),
    (64, 16, "blocks", [33, 256]),
]


def make_blur():
    """Pillow's GaussianBlur (what diffusers' mask_processor.blur calls) on
    grey images: blur.safetensors with `{w}x{h}.{pattern}.in` and
    `.r{radius}` (bytes as f32, [h, w])."""
    import numpy as np
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(77)
    out = {}
    for w, h, pattern, radii in BLUR_CASES:
        if pattern == "noise":
            src = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
        else:
            cells = rng.integers(0, 2, size=(h // 3 + 1, w // 3 + 1)) * 255
            src = np.kron(cells, np.ones((3, 3)))[:h, :w].astype(np.uint8)
        img = Image.fromarray(src, "L")
        out[f"{w}x{h}.{pattern}.in"] = torch.from_numpy(src.astype(np.float32))
        for r in radii:
            dst = np.asarray(img.filter(ImageFilter.GaussianBlur(r)))
            out[f"{w}x{h}.{pattern}.r{r}"] = torch.from_numpy(dst.astype(np.float32))
    save_file(out, os.path.join(ROOT, "blur.safetensors"))


LORA_RANK = 4


def _lora_pair(gen, out_shape, in_shape, rank=LORA_RANK, dtype=torch.float32):
    """Random (up, down) for a weight: up [out, r(, 1, 1)], down [r, in...],
    rounded through `dtype` (what the file stores)."""
    fan_in = 1
    for d in in_shape:
        fan_in *= d
    down = torch.randn((rank, *in_shape), generator=gen) / fan_in ** 0.5
    up = torch.randn((out_shape[0], rank, *([1] * len(in_shape[1:]))), generator=gen) * 0.15
    return up.to(dtype), down.to(dtype)


def _stability_modules(depth, dual):
    """The Stability MMDiT modules of a tiny SD3.5-medium-like model with the
    diffusers modules each maps to: (stability, [(diffusers, part, swap)])
    where part i of 3 takes up's rows i·H..(i+1)·H (fused qkv)."""
    mods = []
    for i in range(depth):
        last = i == depth - 1
        b, d = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        mods.append((f"{b}.x_block.attn.qkv", [(f"{d}.attn.to_{x}", k, False) for k, x in enumerate("qkv")]))
        mods.append((f"{b}.context_block.attn.qkv",
                     [(f"{d}.attn.add_{x}_proj", k, False) for k, x in enumerate("qkv")]))
        mods.append((f"{b}.x_block.attn.proj", [(f"{d}.attn.to_out.0", None, False)]))
        mods.append((f"{b}.x_block.mlp.fc1", [(f"{d}.ff.net.0.proj", None, False)]))
        mods.append((f"{b}.x_block.mlp.fc2", [(f"{d}.ff.net.2", None, False)]))
        mods.append((f"{b}.x_block.adaLN_modulation.1", [(f"{d}.norm1.linear", None, False)]))
        mods.append((f"{b}.context_block.adaLN_modulation.1", [(f"{d}.norm1_context.linear", None, last)]))
        if not last:
            mods.append((f"{b}.context_block.attn.proj", [(f"{d}.attn.to_add_out", None, False)]))
            mods.append((f"{b}.context_block.mlp.fc1", [(f"{d}.ff_context.net.0.proj", None, False)]))
            mods.append((f"{b}.context_block.mlp.fc2", [(f"{d}.ff_context.net.2", None, False)]))
        if i in dual:
            mods.append((f"{b}.x_block.attn2.qkv", [(f"{d}.attn2.to_{x}", k, False) for k, x in enumerate("qkv")]))
            mods.append((f"{b}.x_block.attn2.proj", [(f"{d}.attn2.to_out.0", None, False)]))
    mods += [
        ("final_layer.adaLN_modulation.1", [("norm_out.linear", None, True)]),
        ("final_layer.linear", [("proj_out", None, False)]),
        ("context_embedder", [("context_embedder", None, False)]),
        ("x_embedder.proj", [("pos_embed.proj", None, False)]),
        ("t_embedder.mlp.0", [("time_text_embed.timestep_embedder.linear_1", None, False)]),
        ("y_embedder.mlp.2", [("time_text_embed.text_embedder.linear_2", None, False)]),
    ]
    return mods


LORA_CASES = [
    # (name, seed, [(file, strength)])
    ("peft", 21, [("peft", 1.0)]),
    ("kohya_and_comfy", 22, [("kohya", 0.7), ("comfy", 1.3)]),
]


def make_lora():
    """LoRAs in three layouts for the sd35m pipeline fixture, and
    StableDiffusion3Pipeline's final latents with them fused (f32).

    - lora/peft.safetensors: diffusers/PEFT names for the transformer (every
      linear and the patch conv), CLIP-L and CLIP-G; alpha in the header's
      lora_adapter_metadata (with an alpha_pattern entry), as diffusers saves.
    - lora/kohya.safetensors: sd-scripts names (lora_unet_ on Stability
      modules, fused qkv, per-module alpha, f16 matrices, one alpha of 0),
      CLIP-L (lora_te1_) and T5 (lora_te3_).
    - lora/comfy.safetensors: `diffusion_model.` + Stability names, lora_up /
      lora_down and lora_A / lora_B, with alphas.

    diffusers reads only PEFT names and no T5 LoRA, so the kohya and comfy
    files are converted to PEFT names as ComfyUI applies them (fused qkv's up
    rows split, (shift, scale) halves swapped, alpha / r folded into up) and
    loaded with load_lora_weights; their T5 updates are added to T5's
    weights directly. Then set_adapters(strengths), fuse_lora. Writes
    pipeline/sd35m/lora_io.safetensors (final latents per LORA_CASES case).
    """
    import tempfile
    from diffusers import StableDiffusion3Pipeline

    base = os.path.join(ROOT, "pipeline")
    out_dir = os.path.join(ROOT, "lora")
    os.makedirs(out_dir, exist_ok=True)
    comp = fixture_components()
    t = comp["transformer"]
    weights = dict(t.named_parameters())
    te = {k: dict(comp[k].named_parameters()) for k in ("text_encoder", "text_encoder_2", "text_encoder_3")}
    gen = torch.Generator().manual_seed(1234)

    def shape_of(params, module):
        w = params[module + ".weight"]
        return tuple(w.shape[:1]), tuple(w.shape[1:])

    # PEFT: every linear and the patch conv of the transformer, some CLIP modules.
    peft, peft_targets = {}, {"transformer": [], "text_encoder": [], "text_encoder_2": []}
    for n, mod in t.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            up, down = _lora_pair(gen, *shape_of(weights, n))
            peft[f"transformer.{n}.lora_A.weight"] = down
            peft[f"transformer.{n}.lora_B.weight"] = up.reshape(up.shape[0], LORA_RANK, *up.shape[2:])
            peft_targets["transformer"].append(n)
    for comp_name, mods, rank in (("text_encoder", ("q_proj", "out_proj", "fc1"), 4),
                                  ("text_encoder_2", ("k_proj", "fc2"), 2)):
        for layer in range(2):
            for x in mods:
                sub = "mlp" if x.startswith("fc") else "self_attn"
                n = f"text_model.encoder.layers.{layer}.{sub}.{x}"
                up, down = _lora_pair(gen, *shape_of(te[comp_name], n), rank=rank)
                peft[f"{comp_name}.{n}.lora_A.weight"] = down
                peft[f"{comp_name}.{n}.lora_B.weight"] = up
                peft_targets[comp_name].append(n)
    meta = {}
    for comp_name, r, alpha in (("transformer", 4, 8), ("text_encoder", 4, 4), ("text_encoder_2", 2, 6)):
        meta[f"{comp_name}.r"] = r
        meta[f"{comp_name}.lora_alpha"] = alpha
        meta[f"{comp_name}.target_modules"] = peft_targets[comp_name]
    meta["transformer.alpha_pattern"] = {"transformer_blocks.1.attn.to_q": 2}
    save_file({k: v.contiguous() for k, v in peft.items()}, os.path.join(out_dir, "peft.safetensors"),
              metadata={"lora_adapter_metadata": json.dumps(meta), "format": "pt"})

    # kohya: Stability modules with fused qkv, alphas, f16; CLIP-L and T5.
    kohya, kohya_peft, t5_updates = {}, {}, []
    stab = _stability_modules(2, dual=(0,))

    def stab_shapes(mods):
        rows = sum(shape_of(weights, d)[0][0] for d, part, _ in mods if part in (None, 0)) if mods[0][1] is None \
            else 3 * shape_of(weights, mods[0][0])[0][0]
        return (rows,), shape_of(weights, mods[0][0])[1]

    def to_peft(dst, up, down, alpha, mods, prefix="transformer"):
        rank = down.shape[0]
        scale = (alpha if alpha else rank) / rank
        up = up.float() * scale
        for d, part, swap in mods:
            u = up
            if part is not None:
                h = up.shape[0] // 3
                u = up[part * h:(part + 1) * h]
            if swap:
                a, b = u.chunk(2, dim=0)
                u = torch.cat([b, a], dim=0)
            dst[f"{prefix}.{d}.lora_A.weight"] = down.float().clone()
            dst[f"{prefix}.{d}.lora_B.weight"] = u.clone()

    for k, (sname, mods) in enumerate(stab):
        out_shape, in_shape = stab_shapes(mods)
        up, down = _lora_pair(gen, out_shape, in_shape, dtype=torch.float16)
        alpha = 0.0 if k == 3 else float(1 + k % 5)
        key = "lora_unet_" + sname.replace(".", "_")
        kohya[f"{key}.lora_up.weight"] = up
        kohya[f"{key}.lora_down.weight"] = down
        kohya[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.bfloat16 if k % 2 else torch.float32)
        to_peft(kohya_peft, up, down, float(kohya[f"{key}.alpha"]), mods)
    for n in ("text_model.encoder.layers.0.self_attn.v_proj", "text_model.encoder.layers.1.mlp.fc2"):
        up, down = _lora_pair(gen, *shape_of(te["text_encoder"], n), dtype=torch.float16)
        key = "lora_te1_" + n.replace(".", "_")
        kohya[f"{key}.lora_up.weight"], kohya[f"{key}.lora_down.weight"] = up, down
        kohya[f"{key}.alpha"] = torch.tensor(2.0)
        to_peft(kohya_peft, up, down, 2.0, [(n, None, False)], prefix="text_encoder")
    for n in ("encoder.block.0.layer.0.SelfAttention.k", "encoder.block.1.layer.1.DenseReluDense.wi_0"):
        up, down = _lora_pair(gen, *shape_of(te["text_encoder_3"], n), dtype=torch.float16)
        key = "lora_te3_" + n.replace(".", "_")
        kohya[f"{key}.lora_up.weight"], kohya[f"{key}.lora_down.weight"] = up, down
        kohya[f"{key}.alpha"] = torch.tensor(8.0)
        t5_updates.append(("kohya", n, up.float() @ down.float() * (8.0 / LORA_RANK)))
    save_file({k: v.contiguous() for k, v in kohya.items()}, os.path.join(out_dir, "kohya.safetensors"))

    # Stability / ComfyUI names.
    comfy, comfy_peft = {}, {}
    for k, (sname, mods) in enumerate(stab[::3] + stab[-2:]):
        out_shape, in_shape = stab_shapes(mods)
        up, down = _lora_pair(gen, out_shape, in_shape)
        up_s, down_s = (".lora_B.weight", ".lora_A.weight") if k % 2 else (".lora_up.weight", ".lora_down.weight")
        comfy[f"diffusion_model.{sname}{up_s}"] = up
        comfy[f"diffusion_model.{sname}{down_s}"] = down
        comfy[f"diffusion_model.{sname}.alpha"] = torch.tensor(3.0)
        to_peft(comfy_peft, up, down, 3.0, mods)
    save_file({k: v.contiguous() for k, v in comfy.items()}, os.path.join(out_dir, "comfy.safetensors"))
    converted = {"peft": None, "kohya": kohya_peft, "comfy": comfy_peft}

    io = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case, seed, files in LORA_CASES:
            pipe = StableDiffusion3Pipeline(**fixture_components())
            names = []
            for f, strength in files:
                path = os.path.join(out_dir, f"{f}.safetensors")
                if converted[f] is not None:
                    sd = converted[f]
                    cmeta = {}
                    for c in ("transformer", "text_encoder", "text_encoder_2"):
                        mods = sorted({k[len(c) + 1:].split(".lora_")[0] for k in sd if k.startswith(c + ".")})
                        if mods:
                            cmeta.update({f"{c}.r": LORA_RANK, f"{c}.lora_alpha": LORA_RANK,
                                          f"{c}.target_modules": mods})
                    path = os.path.join(tmp, f"{f}_peft.safetensors")
                    save_file(sd, path, metadata={"lora_adapter_metadata": json.dumps(cmeta), "format": "pt"})
                pipe.load_lora_weights(path, adapter_name=f)
                names.append(f)
            pipe.set_adapters(names, adapter_weights=[s for _, s in files])
            pipe.fuse_lora(components=["transformer", "text_encoder", "text_encoder_2"], lora_scale=1.0)
            pipe.unload_lora_weights()
            with torch.no_grad():
                t5w = dict(pipe.text_encoder_3.named_parameters())
                for f, strength in files:
                    for src, n, delta in t5_updates:
                        if src == f:
                            t5w[n + ".weight"] += strength * delta
                out = pipe(prompt=PIPE_PROMPT, negative_prompt=PIPE_NEGATIVE, num_inference_steps=4,
                           guidance_scale=5.0, height=12, width=20, max_sequence_length=32,
                           generator=torch.Generator().manual_seed(seed), output_type="latent").images
            assert torch.isfinite(out).all()
            io[f"{case}.latents"] = out
            with torch.no_grad():
                plain = StableDiffusion3Pipeline(**fixture_components())(
                    prompt=PIPE_PROMPT, negative_prompt=PIPE_NEGATIVE, num_inference_steps=4, guidance_scale=5.0,
                    height=12, width=20, max_sequence_length=32, generator=torch.Generator().manual_seed(seed),
                    output_type="latent").images
            print(case, "LoRA effect (relative):", float((out - plain).norm() / plain.norm()))
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(base, "sd35m", "lora_io.safetensors"))


CONTROLNET_CASES = [
    # (name, pipeline variant, [(controlnet, control image, scale, start, end)], seed, images per prompt)
    ("sd3_one", "sd3", [("joint_a", "control_a.png", 0.8, 0.0, 1.0)], 31, 1),
    ("sd3_two", "sd3", [("joint_a", "control_a.png", 0.6, 0.0, 0.5), ("joint_b", "control_b.png", 1.2, 0.25, 1.0)],
     32, 1),
    ("sd35l_single_batch2", "sd35l", [("single", "control_a.png", 1.0, 0.0, 1.0)], 33, 2),
]


def make_controlnet():
    """SD3 ControlNets for the pipeline fixtures and
    StableDiffusion3ControlNetPipeline's final latents with them (f32).

    controlnet/joint_a, joint_b: InstantX-style (joint blocks, their own
    patch and position embedding, force_zeros_for_pooled_projection) for the
    sd3 fixture; controlnet/single: Stability SD3.5-large-style (image-only
    blocks, the transformer's patch embedding, pooled text given) for sd35l.
    One block each (the transformers have two, the last of which takes no
    residual), weights stored as f16 to keep the files small (diffusers reads
    them into f32, as we do). The pipeline wants sides that are multiples of
    8: 24x16, with control images pipeline/control_a.png (edges of a disc)
    and control_b.png (stripes). The zero-initialised projections are filled with random values so that
    every ControlNet changes the result. The control image's latents are
    taken as the VAE distribution's mean: diffusers samples them from the
    global RNG (not the generator), which no one can reproduce. Writes
    pipeline/controlnet_io.safetensors (final latents per CONTROLNET_CASES).
    """
    from PIL import Image
    from diffusers import StableDiffusion3ControlNetPipeline
    from diffusers.models import SD3ControlNetModel, SD3MultiControlNetModel
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    import numpy as np

    base = os.path.join(ROOT, "pipeline")
    out_dir = os.path.join(ROOT, "controlnet")
    h, w = 16, 24
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.sqrt((yy - 7.5) ** 2 + (xx - 11.5) ** 2)
    disc = ((np.abs(r - 5.0) < 1.0) * 255).astype("uint8")
    Image.fromarray(disc, "L").convert("RGB").save(os.path.join(base, "control_a.png"))
    stripes = np.stack([(xx * 32) % 256, ((xx + yy) % 4 < 2) * 255, yy * 16], axis=-1).astype("uint8")
    Image.fromarray(stripes, "RGB").save(os.path.join(base, "control_b.png"))
    common = dict(sample_size=16, patch_size=2, in_channels=16, attention_head_dim=64, num_attention_heads=1,
                  caption_projection_dim=64, pooled_projection_dim=64, out_channels=16, pos_embed_max_size=16)
    specs = {
        "joint_a": dict(num_layers=1, joint_attention_dim=208, seed=41),
        "joint_b": dict(num_layers=1, joint_attention_dim=208, seed=42),
        "single": dict(num_layers=1, joint_attention_dim=None, use_pos_embed=False,
                       force_zeros_for_pooled_projection=False, seed=43),
    }
    for name, spec in specs.items():
        spec = dict(spec)
        torch.manual_seed(spec.pop("seed"))
        net = SD3ControlNetModel(**common, **spec).eval()
        with torch.no_grad():
            for n, p in net.named_parameters():
                if n.startswith(("controlnet_blocks", "pos_embed_input")):
                    p.normal_(0.0, 0.1)
        path = os.path.join(out_dir, name)
        shutil.rmtree(path, ignore_errors=True)
        net.to(torch.float16).save_pretrained(path, safe_serialization=True)
    # diffusers draws the control latents with latent_dist.sample() from the global RNG.
    original_sample = DiagonalGaussianDistribution.sample
    DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mean
    io = {}
    try:
        for case, variant, nets, seed, per_prompt in CONTROLNET_CASES:
            comp = fixture_components()
            comp["transformer"] = SD3Transformer2DModel.from_pretrained(
                os.path.join(base, variant, "transformer"), torch_dtype=torch.float32)
            models = [SD3ControlNetModel.from_pretrained(os.path.join(out_dir, n), torch_dtype=torch.float32)
                      for n, *_ in nets]
            images = [Image.open(os.path.join(base, img)).convert("RGB") for _, img, *_ in nets]
            one = len(nets) == 1
            pipe = StableDiffusion3ControlNetPipeline(
                **comp, controlnet=models[0] if one else SD3MultiControlNetModel(models))
            with torch.no_grad():
                out = pipe(prompt=PIPE_PROMPT, negative_prompt=PIPE_NEGATIVE, num_inference_steps=4,
                           guidance_scale=5.0, height=h, width=w, max_sequence_length=32,
                           num_images_per_prompt=per_prompt, generator=torch.Generator().manual_seed(seed),
                           control_image=images[0] if one else images,
                           controlnet_conditioning_scale=nets[0][2] if one else [n[2] for n in nets],
                           control_guidance_start=nets[0][3] if one else [n[3] for n in nets],
                           control_guidance_end=nets[0][4] if one else [n[4] for n in nets],
                           output_type="latent").images
            assert torch.isfinite(out).all()
            io[f"{case}.latents"] = out
    finally:
        DiagonalGaussianDistribution.sample = original_sample
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(base, "controlnet_io.safetensors"))
    print("controlnet cases", [c[0] for c in CONTROLNET_CASES])


def make_gguf_blocks():
    """GGML block formats as the gguf package (llama.cpp's Python reference)
    quantizes and dequantizes them: gguf_blocks.safetensors with, per type,
    `{t}.src` (f32 input, 6 blocks: random, a zero block, one dominated by a
    negative value), `{t}.bytes` (the packed blocks, one byte per f32) and
    `{t}.values` (its dequantization)."""
    import numpy as np
    from gguf import GGMLQuantizationType as T, quants

    rng = np.random.default_rng(99)
    src = rng.standard_normal(6 * 32).astype(np.float32)
    src[64:96] = 0.0
    src[100] = -7.5
    out = {}
    for name in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        qt = getattr(T, name)
        packed = quants.quantize(src.reshape(1, -1), qt)
        values = quants.dequantize(packed, qt).reshape(-1).astype(np.float32)
        key = name.lower()
        out[f"{key}.src"] = torch.from_numpy(src.copy())
        out[f"{key}.bytes"] = torch.from_numpy(packed.reshape(-1).astype(np.float32))
        out[f"{key}.values"] = torch.from_numpy(values)
    # K-quants: the gguf package only dequantizes them. Random super-blocks
    # (every bit pattern of scales and quants is a valid block) with finite,
    # moderate f16 super-scales.
    for name, size, scale_at in (("Q4_K", 144, (0, 2)), ("Q5_K", 176, (0, 2)), ("Q6_K", 210, (208,))):
        qt = getattr(T, name)
        blocks = rng.integers(0, 256, size=(3, size), dtype=np.uint8)
        for at in scale_at:
            d = rng.uniform(0.001, 0.1, size=3).astype(np.float16).view(np.uint8).reshape(3, 2)
            blocks[:, at:at + 2] = d
        values = quants.dequantize(blocks.reshape(1, -1), qt).reshape(-1).astype(np.float32)
        key = name.lower()
        out[f"{key}.bytes"] = torch.from_numpy(blocks.reshape(-1).astype(np.float32))
        out[f"{key}.values"] = torch.from_numpy(values)
    save_file(out, os.path.join(ROOT, "gguf_blocks.safetensors"))


GGUF_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def write_gguf(single, path):
    """Writes a Stability-named state dict as city96's GGUFs are written:
    each 2-D matrix whose rows split into blocks of 32 in one of GGUF_TYPES
    in turn, other matrices f16, everything else f32. Returns the tensors as
    the gguf package dequantizes them."""
    import numpy as np
    from gguf import GGMLQuantizationType as T, GGUFWriter, quants

    writer = GGUFWriter(path, arch="sd3")
    dequant = {}
    k = 0
    for name in sorted(single):
        v = single[name].float().numpy()
        if v.ndim == 2 and v.shape[1] % 32 == 0 and name.endswith(".weight"):
            qt = getattr(T, GGUF_TYPES[k % len(GGUF_TYPES)])
            k += 1
            packed = quants.quantize(v, qt)
            writer.add_tensor(name, packed, raw_dtype=qt)
            dequant[name] = torch.from_numpy(quants.dequantize(packed, qt).reshape(v.shape).astype(np.float32))
        elif v.ndim >= 2 and name.endswith(".weight"):
            h = v.astype(np.float16)
            writer.add_tensor(name, h)
            dequant[name] = torch.from_numpy(h.astype(np.float32))
        else:
            writer.add_tensor(name, v)
            dequant[name] = torch.from_numpy(v)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(path, ": quantized", k, "matrices")
    return dequant


def make_gguf_model():
    """The sd35l MMDiT fixture as a GGUF file (write_gguf), and its forward
    pass run by diffusers on the same weights dequantized by the gguf package
    (inputs of mmdit/sd35l_io.safetensors case0): mmdit/sd35l.gguf and
    mmdit/sd35l_gguf_io.safetensors (`out`). Also the sd35l pipeline
    fixture's transformer as pipeline/sd35l.gguf, for end-to-end runs with
    --vae and the separate text encoders.
    """
    from safetensors.torch import load_file

    base = os.path.join(ROOT, "mmdit")
    model = SD3Transformer2DModel.from_pretrained(os.path.join(base, "sd35l", "transformer"),
                                                  torch_dtype=torch.float32).eval()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    single = to_single_file(sd, model.config.num_layers, model.inner_dim)
    dequant = write_gguf(single, os.path.join(base, "sd35l.gguf"))
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(dequant))
    model.load_state_dict(back)
    io = load_file(os.path.join(base, "sd35l_io.safetensors"))
    with torch.no_grad():
        out = model(hidden_states=io["case0.x"], encoder_hidden_states=io["case0.context"],
                    pooled_projections=io["case0.pooled"], timestep=io["case0.t"]).sample
    assert torch.isfinite(out).all()
    save_file({"out": out.contiguous()}, os.path.join(base, "sd35l_gguf_io.safetensors"))
    pipe = SD3Transformer2DModel.from_pretrained(os.path.join(ROOT, "pipeline", "sd35l", "transformer"),
                                                 torch_dtype=torch.float32)
    psd = {k: v.detach().clone() for k, v in pipe.state_dict().items()}
    pdequant = write_gguf(to_single_file(psd, pipe.config.num_layers, pipe.inner_dim),
                          os.path.join(ROOT, "pipeline", "sd35l.gguf"))
    # The whole pipeline on the GGUF's dequantized transformer: final latents.
    from diffusers import StableDiffusion3Pipeline
    pipe.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(dict(pdequant)))
    comp = fixture_components()
    comp["transformer"] = pipe
    with torch.no_grad():
        lat = StableDiffusion3Pipeline(**comp)(
            prompt=PIPE_PROMPT, negative_prompt=PIPE_NEGATIVE, num_inference_steps=4, guidance_scale=5.0,
            height=12, width=20, max_sequence_length=32, generator=torch.Generator().manual_seed(5),
            output_type="latent").images
    assert torch.isfinite(lat).all()
    save_file({"latents": lat.contiguous()}, os.path.join(ROOT, "pipeline", "sd35l_gguf_io.safetensors"))


def make_gguf_t5():
    """The T5 fixture (text/text_encoder_3) as a llama.cpp T5-encoder GGUF
    (city96's t5-v1_1-xxl-encoder GGUFs: llama.cpp's names, written with
    the gguf package), matrices whose rows split into blocks of 32 in Q8_0
    and Q5_0, the others f16, norms and the relative position bias f32; and
    transformers' T5EncoderModel on the gguf package's dequantization of it
    for the fixture's first three T5 id rows: text/t5.gguf and
    text/t5_gguf_io.safetensors (`ids`, `out`)."""
    import numpy as np
    from safetensors.torch import load_file
    from gguf import GGMLQuantizationType as T, GGUFWriter, quants
    from transformers import T5EncoderModel

    text = os.path.join(ROOT, "text")
    model = T5EncoderModel.from_pretrained(os.path.join(text, "text_encoder_3"), torch_dtype=torch.float32).eval()
    names = {"shared.weight": "token_embd.weight", "encoder.final_layer_norm.weight": "enc.output_norm.weight"}
    parts = {"layer.0.layer_norm": "attn_norm", "layer.0.SelfAttention.q": "attn_q",
             "layer.0.SelfAttention.k": "attn_k", "layer.0.SelfAttention.v": "attn_v",
             "layer.0.SelfAttention.o": "attn_o", "layer.0.SelfAttention.relative_attention_bias": "attn_rel_b",
             "layer.1.layer_norm": "ffn_norm", "layer.1.DenseReluDense.wi_0": "ffn_gate",
             "layer.1.DenseReluDense.wi_1": "ffn_up", "layer.1.DenseReluDense.wo": "ffn_down"}
    for b in range(model.config.num_layers):
        for k, v in parts.items():
            names[f"encoder.block.{b}.{k}.weight"] = f"enc.blk.{b}.{v}.weight"
    writer = GGUFWriter(os.path.join(text, "t5.gguf"), arch="t5encoder")
    sd = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    dequant = {}
    k = 0
    for name in sorted(sd):
        if name not in names:
            continue  # encoder.embed_tokens.weight: tied to shared
        v = sd[name].numpy()
        if v.ndim == 2 and v.shape[1] % 32 == 0 and "rel_b" not in names[name] and "embd" not in names[name]:
            qt = (T.Q8_0, T.Q5_0)[k % 2]
            k += 1
            packed = quants.quantize(v, qt)
            writer.add_tensor(names[name], packed, raw_dtype=qt)
            d = quants.dequantize(packed, qt).reshape(v.shape).astype(np.float32)
        elif v.ndim == 2 and "rel_b" not in names[name]:
            writer.add_tensor(names[name], v.astype(np.float16))
            d = v.astype(np.float16).astype(np.float32)
        else:
            writer.add_tensor(names[name], v)
            d = v
        dequant[name] = torch.from_numpy(d.copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    dequant["encoder.embed_tokens.weight"] = dequant["shared.weight"]
    model.load_state_dict(dequant)
    ids = load_file(os.path.join(text, "text_io.safetensors"))["ids.t5"][:3].long()
    with torch.no_grad():
        out = model(input_ids=ids).last_hidden_state
    save_file({"ids": ids.float().contiguous(), "out": out.contiguous()}, os.path.join(text, "t5_gguf_io.safetensors"))
    print("t5 gguf: quantized", k, "matrices")


def make_builtin_tokenizer_ids():
    """Token ids of the tokenizers the binary carries (assets/tokenizers/),
    as transformers makes them, for text/prompts.json (many scripts, emoji):
    CLIPTokenizer from the vocabulary and merges that OpenAI's BPE file gives
    (SD3's tokenizer/ padded with <|endoftext|>, tokenizer_2/ with "!"), and
    T5TokenizerFast from T5 v1.1's tokenizer.json. Writes
    text/builtin_ids.safetensors (`clip_l`, `clip_g` [n, 77], `t5` [n, 32])."""
    import gzip
    import tempfile
    from transformers import CLIPTokenizer, T5TokenizerFast

    assets = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "assets", "tokenizers")
    lines = gzip.open(os.path.join(assets, "clip_bpe_simple_vocab_16e6.txt.gz")).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(ROOT, "text", "prompts.json")) as f:
        prompts = json.load(f)["prompts"]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w") as f:
            json.dump({t: i for i, t in enumerate(vocab)}, f)
        with open(os.path.join(tmp, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        for key, pad in (("clip_l", "<|endoftext|>"), ("clip_g", "!")):
            tok = CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"), pad_token=pad)
            ids = tok(prompts, padding="max_length", max_length=77, truncation=True).input_ids
            out[key] = torch.tensor(ids, dtype=torch.float32)
        with open(os.path.join(tmp, "t5.json"), "wb") as f:
            f.write(gzip.open(os.path.join(assets, "t5_v1_1_tokenizer.json.gz")).read())
        t5 = T5TokenizerFast(tokenizer_file=os.path.join(tmp, "t5.json"), eos_token="</s>", pad_token="<pad>",
                             unk_token="<unk>", extra_ids=100)
        ids = t5(prompts, padding="max_length", max_length=32, truncation=True).input_ids
        out["t5"] = torch.tensor(ids, dtype=torch.float32)
    save_file(out, os.path.join(ROOT, "text", "builtin_ids.safetensors"))
    print("builtin tokenizer ids for", len(prompts), "prompts")


if __name__ == "__main__":
    import sys
    if sys.argv[1:] == ["img2img"]:
        make_img2img()
        sys.exit()
    if sys.argv[1:] == ["tokenizers"]:
        make_builtin_tokenizer_ids()
        sys.exit()
    if sys.argv[1:] == ["gguf"]:
        make_gguf_blocks()
        make_gguf_model()
        make_gguf_t5()
        sys.exit()
    if sys.argv[1:] == ["controlnet"]:
        make_controlnet()
        sys.exit()
    if sys.argv[1:] == ["lora"]:
        make_lora()
        sys.exit()
    if sys.argv[1:] == ["stream"]:
        make_stream()
        sys.exit()
    if sys.argv[1:] == ["inpaint"]:
        make_blur()
        make_inpaint()
        sys.exit()
    main()
    make_vae()
    make_text()
    make_pipelines()
    make_rng()
    make_stream()
    make_img2img()
    make_blur()
    make_inpaint()
    make_lora()
    make_controlnet()
    make_gguf_blocks()
    make_gguf_model()
    make_gguf_t5()
    make_builtin_tokenizer_ids()
