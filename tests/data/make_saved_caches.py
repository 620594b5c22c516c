"""Writes the saved caches of ``tests/data/cache-v<N>``. Run once per file format, with the
mlxkv of that format, on the default model:

    python tests/data/make_saved_caches.py 1 tests/data/cache-v1   # mlxkv 0.1 (commit 30baf38)
    python tests/data/make_saved_caches.py 2 tests/data/cache-v2   # mlxkv 0.2 (commit d44bdff)
    gzip -9 -n tests/data/cache-v<N>/*.safetensors

Each ``<name>.safetensors.gz`` is a cache in that version's file format (1: every layer's
arrays by position; 2: by name) after a short chat prompt; ``expected.json`` holds, per
file, the token ids fed next and the greedy tokens that version generated from them. The
test (``tests/test_persist_compat.py``) loads each file with today's code and asserts the
same tokens come out."""

import json
import sys
from pathlib import Path

import mlxkv
from mlxkv import CacheConfig
from mlxkv.generation import prefill
from mlxkv.persist import save_cache

CONFIGS = {
    "quantized-4bit": CacheConfig(key_bits=4, value_bits=4, group_size=32),
    "kivi-2bit": CacheConfig(key_bits=2, value_bits=2, group_size=32, key_mode="channel"),
    "window-4bit": CacheConfig(window=24, sinks=4, key_bits=4, value_bits=4, group_size=32),
    "budget-snapkv": CacheConfig(budget="360KB", key_bits=4, value_bits=4, group_size=32,
                                 policy="snapkv"),
    "budget-h2o-adaptive": CacheConfig(budget="360KB", key_bits=4, value_bits=4, group_size=32,
                                       policy="h2o", allocator="adaptive"),
}


def since_0_2() -> dict:
    """Configs of settings 0.1 did not have (made only when asked: 0.1 cannot build them)."""
    return {
        "codebook-3bit-outlier": CacheConfig(key_bits=3, value_bits=3, quant="codebook",
                                             outliers=1),
        "codebook-2bit-middle": CacheConfig(key_bits=2, value_bits=2, quant="codebook",
                                            middle=32, middle_bits=3),
        "budget-tova": CacheConfig(budget="360KB", key_bits=4, value_bits=4, group_size=32,
                                   policy="tova"),
    }


def main(version: int, out: Path):
    configs = {**CONFIGS, **(since_0_2() if version >= 2 else {})}
    model, tok = mlxkv.load()
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Name three rivers of Europe and say where each one "
                                     "meets the sea. Keep it short."}],
        add_generation_prompt=True)
    follow = tok.encode(" The first", add_special_tokens=False)
    expected = {}
    for name, config in configs.items():
        cache = mlxkv.make_cache(model, config)
        prefill(model, prompt, cache, prefill_step=32)
        save_cache(out / f"{name}.safetensors", cache, model=model, config=config,
                   tokens=prompt)
        tokens = []
        for event in mlxkv.stream_generate(model, tok, follow, cache=cache, max_tokens=12):
            tokens.extend(event.tokens)
        expected[name] = {"feed": follow, "greedy": tokens}
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))
