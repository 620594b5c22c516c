"""Caches saved by mlxkv 0.1 and 0.2 (``tests/data/cache-v1``, ``cache-v2``, each written
by that version's code with ``tests/data/make_saved_caches.py``) load with today's code
and continue exactly as that version continued them."""

import gzip
import json
import shutil
from pathlib import Path

import pytest

from mlxkv import stream_generate
from mlxkv.persist import load_cache, save_cache

DATA = Path(__file__).parent / "data"
CASES = [(version, name) for version in ("cache-v1", "cache-v2")
         for name in sorted(json.loads((DATA / version / "expected.json").read_text()))]


@pytest.mark.parametrize("version,name", CASES)
def test_a_saved_cache_loads_and_continues_as_it_did(version, name, smollm, tmp_path):
    model, tok = smollm
    path = tmp_path / f"{name}.safetensors"
    with gzip.open(DATA / version / f"{name}.safetensors.gz") as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    cache, config, tokens, _ = load_cache(path, model)
    assert cache[0].offset == len(tokens) > 0
    # saved again in today's format, it loads back to the same cache
    again = save_cache(tmp_path / "again.safetensors", cache, model=model, config=config,
                       tokens=tokens)
    cache2, config2, tokens2, _ = load_cache(again, model)
    assert config2 == config and tokens2 == tokens
    want = json.loads((DATA / version / "expected.json").read_text())[name]
    # the cache saved again from the loaded one continues as the saved version did (so the
    # loaded one holds the same state)
    out = []
    for event in stream_generate(model, tok, want["feed"], cache=cache2, max_tokens=len(want["greedy"])):
        out.extend(event.tokens)
    assert out == want["greedy"]
