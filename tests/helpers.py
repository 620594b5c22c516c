"""Test helpers: tiny GGUF llama files and tiny HF-format model folders, written on the fly."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENS = SPECIALS + _bytes_to_unicode() + ["Ġt", "he", "Ġthe"]
MERGES = ["Ġ t", "h e", "Ġt he"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

DIMS = dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128)


def tiny_gguf_weights(seed: int = 0) -> dict[str, mx.array]:
    mx.random.seed(seed)
    d, f, hd = DIMS["hidden"], DIMS["ffn"], DIMS["hidden"] // DIMS["heads"]
    kv = DIMS["kv_heads"] * hd
    w = {"token_embd.weight": mx.random.normal((len(TOKENS), d)) * 0.1,
         "output_norm.weight": mx.ones((d,))}
    for i in range(DIMS["layers"]):
        for name, shape in [("attn_q", (d, d)), ("attn_k", (kv, d)), ("attn_v", (kv, d)),
                            ("attn_output", (d, d)), ("ffn_gate", (f, d)), ("ffn_up", (f, d)),
                            ("ffn_down", (d, f))]:
            w[f"blk.{i}.{name}.weight"] = mx.random.normal(shape) * 0.1
        w[f"blk.{i}.attn_norm.weight"] = mx.ones((d,))
        w[f"blk.{i}.ffn_norm.weight"] = mx.ones((d,))
    return w


def tiny_gguf_metadata() -> dict:
    u32 = lambda v: mx.array(v, dtype=mx.uint32)  # noqa: E731
    return {
        "general.architecture": "llama",
        "llama.embedding_length": u32(DIMS["hidden"]),
        "llama.block_count": u32(DIMS["layers"]),
        "llama.feed_forward_length": u32(DIMS["ffn"]),
        "llama.attention.head_count": u32(DIMS["heads"]),
        "llama.attention.head_count_kv": u32(DIMS["kv_heads"]),
        "llama.attention.layer_norm_rms_epsilon": mx.array(1e-5, dtype=mx.float32),
        "llama.rope.freq_base": mx.array(10000.0, dtype=mx.float32),
        "llama.context_length": u32(512),
        "llama.vocab_size": u32(len(TOKENS)),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": TOKENS,
        "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.token_type": mx.array([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)),
                                              dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": u32(1),
        "tokenizer.ggml.eos_token_id": u32(2),
        "tokenizer.ggml.padding_token_id": u32(0),
        "tokenizer.chat_template": TEMPLATE,
    }


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    mx.save_gguf(str(path), tiny_gguf_weights(seed), tiny_gguf_metadata())
    return path


def write_tiny_hf_folder(folder: Path, seed: int = 0) -> Path:
    """The tiny llama as an HF/MLX safetensors folder (config, weights, tokenizer)."""
    from mlxkv.models.gguf import build_model, build_tokenizer

    from mlx.utils import tree_flatten

    folder.mkdir(parents=True, exist_ok=True)
    model = build_model(tiny_gguf_weights(seed), tiny_gguf_metadata())
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    args = model.args
    config = {k: getattr(args, k) for k in (
        "model_type", "hidden_size", "num_hidden_layers", "intermediate_size",
        "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "vocab_size",
        "rope_theta", "rope_traditional", "max_position_embeddings", "tie_word_embeddings")}
    config["eos_token_id"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    build_tokenizer(tiny_gguf_metadata())._tokenizer.save_pretrained(str(folder))
    return folder


def write_tiny_llama_folder(folder: Path, *, heads: int = 8, kv_heads: int = 4, head_dim: int = 32,
                            layers: int = 2, ffn: int = 256, seed: int = 0) -> Path:
    """A random-weight llama (any head counts) as an HF/MLX folder, with the tiny
    tokenizer: for models the GGUF one cannot be (4 kv heads, head dim 32)."""
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    from mlxkv.models.gguf import build_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    config = dict(model_type="llama", hidden_size=heads * head_dim, num_hidden_layers=layers,
                  intermediate_size=ffn, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  head_dim=head_dim, rms_norm_eps=1e-5, vocab_size=len(TOKENS), rope_theta=10000.0,
                  rope_traditional=False, max_position_embeddings=4096, tie_word_embeddings=False,
                  eos_token_id=2)
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    # twice the default init, with its own output head: greedy decoding then wanders over
    # the vocabulary (at 1x it repeats one token, which would hide a wrong token order)
    weights = {k: (2 * v).astype(mx.float32) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config))
    build_tokenizer(tiny_gguf_metadata())._tokenizer.save_pretrained(str(folder))
    return folder
