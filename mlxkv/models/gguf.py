"""Load a GGUF file of the llama architecture into an mlx-lm llama model.

Weights come from ``mx.load(path, return_metadata=True)``: Q4_0/Q4_1/Q8_0 tensors arrive
as MLX affine-quantized triples (weight, scales, biases) with group size 32 and stay
quantized; the bits of each layer follow from its packed shape (embeddings are often
8-bit while the rest is 4-bit). GGUF stores q/k permuted for the interleaved rope, so
the model uses the "traditional" rope layout. The tokenizer is built from the metadata
with ``tokenizers`` and wrapped in mlx-lm's ``TokenizerWrapper``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..errors import ModelFileError

GGUF_GROUP_SIZE = 32

# GGUF tensor name -> mlx-lm llama parameter name
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def _scalar(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    value = meta.get(key, default)
    if isinstance(value, mx.array):
        return value.item()
    return value


def _mlx_name(gguf_name: str) -> str:
    stem, leaf = gguf_name.rsplit(".", 1)
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        if part not in _LAYER_NAMES:
            raise ModelFileError(f"GGUF tensor {gguf_name} is not part of a llama model")
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{leaf}"
    if stem not in _TOP_NAMES:
        raise ModelFileError(f"GGUF tensor {gguf_name} is not part of a llama model")
    return f"{_TOP_NAMES[stem]}.{leaf}"


def read_gguf(path: Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """``mx.load`` with every failure turned into a ModelFileError naming the file."""
    try:
        weights, meta = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError, OSError) as e:
        raise ModelFileError(f"cannot read GGUF file {path}: {e}") from None
    return weights, meta


def model_args(meta: dict[str, Any], weights: dict[str, mx.array]) -> dict[str, Any]:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ModelFileError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    n_heads = _scalar(meta, "llama.attention.head_count")
    hidden = _scalar(meta, "llama.embedding_length")
    n_layers = _scalar(meta, "llama.block_count")
    vocab = _scalar(meta, "llama.vocab_size") or len(meta["tokenizer.ggml.tokens"])
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": n_layers,
        "intermediate_size": _scalar(meta, "llama.feed_forward_length"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": _scalar(meta, "llama.attention.head_count_kv", n_heads),
        "rms_norm_eps": _scalar(meta, "llama.attention.layer_norm_rms_epsilon", 1e-5),
        "vocab_size": vocab,
        "rope_theta": _scalar(meta, "llama.rope.freq_base", 10000.0),
        "rope_traditional": True,
        "max_position_embeddings": _scalar(meta, "llama.context_length"),
        "tie_word_embeddings": "output.weight" not in weights,
    }


def build_model(weights: dict[str, mx.array], meta: dict[str, Any]) -> nn.Module:
    from mlx_lm.models import llama

    args = model_args(meta, weights)
    try:
        mapped = {_mlx_name(k): v for k, v in weights.items()}
    except ValueError:
        raise ModelFileError("GGUF tensor names do not follow the llama layout") from None
    # Layers that arrived quantized: bits from the packed width and the number of groups.
    bits = {}
    for name, scales in mapped.items():
        if name.endswith(".scales"):
            layer = name[: -len(".scales")]
            packed = mapped[layer + ".weight"].shape[-1]
            bits[layer] = packed * 32 // (scales.shape[-1] * GGUF_GROUP_SIZE)

    model = llama.Model(llama.ModelArgs(**args))
    if bits:
        nn.quantize(
            model,
            class_predicate=lambda path, _m: (
                {"group_size": GGUF_GROUP_SIZE, "bits": bits[path]} if path in bits else False
            ),
        )
    try:
        model.load_weights(list(mapped.items()), strict=True)
    except ValueError as e:
        raise ModelFileError(f"GGUF weights do not fit a llama model: {e}") from None
    model.eval()
    return model


_PRE_TOKENIZERS = {
    # GGUF tokenizer.ggml.pre -> regex split applied before byte-level BPE (None: GPT-2's)
    "default": None,
    "gpt2": None,
    "smollm": "digits",
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def build_tokenizer(meta: dict[str, Any], chat_template: str | None = None):
    """A ``TokenizerWrapper`` from GGUF metadata (byte-level BPE, ``tokenizer.ggml.model = gpt2``)."""
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelFileError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ModelFileError(f"GGUF pre-tokenizer {pre!r} is not supported (known: {', '.join(_PRE_TOKENIZERS)})")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               ignore_merges=False))
    split = _PRE_TOKENIZERS[pre]
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type")
    if types is not None:
        # 3 = control, 4 = user-defined: matched whole, never split by BPE
        special = [tokens[i] for i, t in enumerate(types.tolist()) if t in (3, 4)]
        tok.add_special_tokens(special)

    def token(key):
        idx = _scalar(meta, key)
        return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

    bos, eos = token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")
    if _scalar(meta, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        bos_id = _scalar(meta, "tokenizer.ggml.bos_token_id")
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token=token("tokenizer.ggml.unknown_token_id"),
        pad_token=token("tokenizer.ggml.padding_token_id"),
        chat_template=chat_template or meta.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )
    return TokenizerWrapper(hf, BPEStreamingDetokenizer,
                            eos_token_ids=[_scalar(meta, "tokenizer.ggml.eos_token_id")])


def load_gguf(path: Path, *, chat_template: str | None = None):
    weights, meta = read_gguf(path)
    try:
        model = build_model(weights, meta)
        tokenizer = build_tokenizer(meta, chat_template)
    except KeyError as e:
        raise ModelFileError(f"GGUF file {path} lacks metadata {e}") from None
    return model, tokenizer
