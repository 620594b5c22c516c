"""Byte budgets, live statistics and saved caches, on the real default model."""

import dataclasses
import json
import os

import mlx.core as mx
from mlx.utils import tree_flatten
import pytest

import mlxkv
from mlxkv.budget import parse_bytes
from mlxkv.cache.config import CacheConfig
from mlxkv.cache.make import make_cache
from mlxkv.cache.shape import attach_shape
from mlxkv.errors import CacheFileError, InputError
from mlxkv.generation import prefill
from mlxkv.persist import load_cache, save_cache


@pytest.mark.parametrize("text,value", [("64MB", 64_000_000), ("64MiB", 64 << 20), ("1.5 GB", 1_500_000_000),
                                        ("512KiB", 512 << 10), ("1000", 1000), ("12b", 12), (4096, 4096)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "MB", "12 parsecs", "-5MB", "0"])
def test_parse_bytes_rejects(text):
    with pytest.raises(InputError):
        parse_bytes(text)


def _stream(model, cache, tokens, chunk, check):
    for i in range(0, tokens.shape[0], chunk):
        model(tokens[None, i:i + chunk], cache=cache)
        mx.eval([c.state for c in cache])
        check()


@pytest.mark.parametrize("config,prompt", [
    (CacheConfig(budget="4MB"), 4096),
    (CacheConfig(budget="8MB", key_bits=4, value_bits=4, group_size=32, key_mode="channel",
                 residual=64), 4096),
    (CacheConfig(budget="2MB", key_bits=2, value_bits=2, group_size=32), 1024),
    (CacheConfig(budget="4MB", key_bits=2, value_bits=2, quant="codebook", middle=128,
                 policy="snapkv"), 1024),
    pytest.param(CacheConfig(budget="16MB", key_bits=4, value_bits=4, group_size=32), 20480,
                 marks=pytest.mark.slow),
])
def test_total_bytes_never_exceed_budget(smollm, config, prompt):
    model, _ = smollm
    budget = parse_bytes(config.budget)
    cache = make_cache(model, config)
    tokens = mx.random.randint(0, 40000, (prompt + 64,), key=mx.random.key(1))
    seen = []

    def check():
        st = mlxkv.cache_stats(cache)
        assert st.nbytes <= budget
        assert st.nbytes == sum(a.nbytes for c in cache for _, a in tree_flatten(c.state))
        assert st.budget <= budget
        for layer in st.layers:
            assert layer.kept + layer.evicted == layer.seen
        seen.append(st.seen)

    _stream(model, cache, tokens[:prompt], 512, check)     # prefill of a long prompt
    _stream(model, cache, tokens[prompt:], 1, check)       # then token by token
    assert seen[-1] == prompt + 64
    st = mlxkv.cache_stats(cache)
    assert st.nbytes > 0.8 * budget                        # the budget is used, not wasted
    # evicting: less than an fp16 cache of every token seen would take
    assert st.evicted > 0 and st.nbytes < st.fp16_nbytes * st.seen / st.kept
    assert st.compression >= 1  # kept tokens against their uncompressed size


def test_budget_too_small_is_a_clear_error(smollm):
    model, _ = smollm
    with pytest.raises(InputError, match="too small"):
        make_cache(model, CacheConfig(budget="100KB"))
    with pytest.raises(InputError, match="not both"):
        make_cache(model, CacheConfig(budget="8MB", window=100))


def test_bounded_caches_go_past_the_context_length(smollm):
    """A tiny llama with a 64-token context: a budgeted cache keeps generating past it
    (the cache is neither wiped nor an error); a full cache refuses with a clear error."""
    from conftest import tiny_model

    _, tok = smollm
    model = tiny_model("llama", max_position_embeddings=64, vocab_size=49152)
    cache = make_cache(model, CacheConfig(budget="64KB", sinks=4))
    events = list(mlxkv.stream_generate(model, tok, list(range(5, 105)), max_tokens=50,
                                        cache=cache, prefill_step=32))
    last = events[-1]
    assert last.finish_reason in ("length", "eos") and last.cache.seen > 64
    assert last.cache.nbytes <= 64_000 and last.cache.evicted > 0
    with pytest.raises(InputError, match="context of 64"):
        next(mlxkv.stream_generate(model, tok, list(range(5, 105)), cache=make_cache(model)))


@pytest.mark.parametrize("config", [
    CacheConfig(),
    CacheConfig(key_bits=4, value_bits=4, group_size=32, key_mode="channel", residual=32, rotate=True),
    CacheConfig(budget="2MB", key_bits=4, value_bits=4, group_size=32),
    CacheConfig(key_bits=2, value_bits=2, quant="codebook", middle=32, residual=16),
])
def test_save_load_round_trip_gives_identical_logits(smollm, tmp_path, config):
    model, tok = smollm
    tokens = tok.encode("The lighthouse keeper counted the ships that passed each night. " * 8)
    cache = make_cache(model, config)
    model(mx.array([tokens[:-1]]), cache=cache)
    path = save_cache(tmp_path / "chat.safetensors", cache, model=model, config=config,
                      tokens=tokens[:-1], extra={"title": "lighthouse"})
    expected = model(mx.array([tokens[-1:]]), cache=cache)
    loaded, cfg, ids, extra = load_cache(path, model)
    assert cfg == config and ids == tokens[:-1] and extra == {"title": "lighthouse"}
    got = model(mx.array([tokens[-1:]]), cache=loaded)
    assert mx.array_equal(expected, got).item()
    # The file holds the cache as stored (packed), not a dequantized copy.
    assert os.path.getsize(path) < sum(c.nbytes for c in loaded) + 200_000


def test_corrupt_and_mismatched_files_are_clear_errors(smollm, tmp_path):
    model, tok = smollm
    config = CacheConfig(key_bits=8, value_bits=8, group_size=32)
    cache = make_cache(model, config)
    model(mx.array([[1, 2, 3, 4]]), cache=cache)
    path = save_cache(tmp_path / "c.safetensors", cache, model=model, config=config, tokens=[1, 2, 3, 4])
    good = path.read_bytes()
    # Truncated file.
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(CacheFileError, match="c.safetensors"):
        load_cache(path, model)
    # Another model's cache.
    path.write_bytes(good)
    saved = mlxkv.shape_of(model)
    other = dict(saved.identity, name="another-model", layers=12)
    try:
        attach_shape(model, dataclasses.replace(saved, name="another-model", identity=other))
        with pytest.raises(CacheFileError, match="smollm2-135m"):
            load_cache(path, model)
    finally:
        attach_shape(model, saved)
    # Not a cache file at all.
    mx.save_safetensors(str(tmp_path / "x.safetensors"), {"a": mx.zeros(3)})
    with pytest.raises(CacheFileError, match="not an mlxkv cache"):
        load_cache(tmp_path / "x.safetensors", model)
    with pytest.raises(CacheFileError, match="no saved cache"):
        load_cache(tmp_path / "missing.safetensors", model)


def test_interrupted_save_leaves_the_old_file(smollm, tmp_path, monkeypatch):
    model, _ = smollm
    config = CacheConfig()
    cache = make_cache(model, config)
    model(mx.array([[1, 2, 3]]), cache=cache)
    path = save_cache(tmp_path / "c.safetensors", cache, model=model, config=config, tokens=[1, 2, 3])
    before = path.read_bytes()

    def crash(file, arrays, metadata):
        with open(file, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(mx, "save_safetensors", crash)
    model(mx.array([[4]]), cache=cache)
    with pytest.raises(OSError):
        save_cache(path, cache, model=model, config=config, tokens=[1, 2, 3, 4])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]
    monkeypatch.undo()
    assert load_cache(path, model)[2] == [1, 2, 3]
    assert json.loads(json.dumps(config.to_dict()))["budget"] is None


def test_chat_resumes_from_saved_cache_without_reprefill(smollm, tmp_path):
    model, tok = smollm
    config = CacheConfig(budget="8MB", key_bits=8, value_bits=8, group_size=32)
    chat = mlxkv.ChatSession(model, tok, cache_config=config, max_tokens=16)
    chat.ask("What is the capital of France?")
    chat.save(tmp_path / "chat.json")
    doc = json.loads((tmp_path / "chat.json").read_text())  # the one conversation document
    assert doc["messages"] == chat.messages and doc["cache_config"]["budget"] == 8_000_000
    resumed = mlxkv.ChatSession.resume(tmp_path / "chat.json", model, tok, max_tokens=16)
    assert resumed.resume_note is None
    assert resumed.messages == chat.messages and resumed.cached_tokens == chat.cached_tokens
    assert resumed.ask("And of Italy?") == chat.ask("And of Italy?")
    assert resumed.last_fed == chat.last_fed < 20


def test_chats_saved_by_0_1_still_resume(smollm, tmp_path):
    """mlxkv 0.1 saved a chat as one cache file with the conversation in its metadata."""
    model, tok = smollm
    config = CacheConfig(budget="8MB", key_bits=8, value_bits=8, group_size=32)
    chat = mlxkv.ChatSession(model, tok, cache_config=config, max_tokens=16)
    chat.ask("What is the capital of France?")
    save_cache(tmp_path / "old.safetensors", chat.cache, model=model, config=config,
               tokens=chat.cached_tokens, extra={"messages": chat.messages, "system": None})
    resumed = mlxkv.ChatSession.resume(tmp_path / "old.safetensors", model, tok, max_tokens=16)
    assert resumed.messages == chat.messages and resumed.cached_tokens == chat.cached_tokens
    assert resumed.ask("And of Italy?") == chat.ask("And of Italy?")


def test_budgeted_chat_continues_without_rebuilding(smollm):
    """A bounded cache cannot be trimmed: over several turns only each new turn is fed,
    and the cache holds every token the conversation went through."""
    model, tok = smollm
    config = CacheConfig(budget="4MB", key_bits=4, value_bits=4, group_size=32)
    chat = mlxkv.ChatSession(model, tok, cache_config=config, max_tokens=48)
    for question in ["Tell me a short story about a cat.", "What is its name?",
                     "Write a haiku about rain.", "What is 2 + 2?"]:
        before = chat.cache[0].offset
        chat.ask(question)
        assert chat.last_fed < 40
        assert chat.cache[0].offset == len(chat.cached_tokens) > before
    assert mlxkv.cache_stats(chat.cache).nbytes <= 4_000_000


def test_reconfigure_rebuilds_from_the_conversation(smollm):
    model, tok = smollm
    chat = mlxkv.ChatSession(model, tok, max_tokens=16)
    chat.ask("What is the capital of France?")
    messages = list(chat.messages)
    seen = []
    chat.reconfigure(CacheConfig(key_bits=8, value_bits=8, group_size=32),
                     progress=lambda done, total: seen.append((done, total)))
    assert chat.messages == messages and seen and seen[-1][0] == seen[-1][1]
    assert chat.cache_config.key_bits == 8
    rendered = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert chat.cache[0].offset == len(rendered) and chat.cached_tokens == list(rendered)
    assert "Berlin" in chat.ask("And of Germany?")
    with pytest.raises(mlxkv.MlxkvError, match="too small"):
        chat.reconfigure(CacheConfig(budget="1KB"))
    assert chat.cache_config.key_bits == 8 and len(chat.messages) == 4


def test_scoring_policies_cost_about_what_the_window_costs_in_prefill(smollm):
    """A budget bounds the process, not only the cache: prefill with attention statistics
    keeps no layer's score matrix past its layer (peak within 10% of the window policy)."""
    model, _ = smollm
    tokens = mx.random.randint(0, model.args.vocab_size, (1024,), key=mx.random.key(0))

    def peak(policy, allocator="uniform"):
        mx.clear_cache()
        mx.reset_peak_memory()
        cache = make_cache(model, CacheConfig(budget="16MB", key_bits=4, value_bits=4, residual=64,
                                              policy=policy, allocator=allocator))
        prefill(model, tokens, cache, prefill_step=512)
        return mx.get_peak_memory()

    window = peak("window")
    for policy, allocator in [("h2o", "uniform"), ("snapkv", "uniform"), ("snapkv", "adaptive")]:
        assert peak(policy, allocator) <= 1.10 * window, (policy, allocator)
