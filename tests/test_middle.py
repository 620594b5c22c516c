"""Bits by token age: a middle of more bits between the residual and the ring
(``Layout.middle``), on random keys and tiny models; the real model in test_budget."""

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

import mlxkv
from mlxkv import settings
from mlxkv.cache.config import CacheConfig
from mlxkv.cache.make import make_cache
from mlxkv.cache.quantized import QuantizedCache
from mlxkv.cache.scored import ScoredCache
from mlxkv.cache.window import WindowCache
from mlxkv.errors import InputError
from mlxkv.policies import make_policy

from conftest import tiny_model
from test_caches import ref_attention

B, H, D = 1, 2, 64
MIDDLE = dict(key_bits=2, value_bits=2, group_size=32, residual=16, middle=64)


def _data(T, seed=0):
    mx.random.seed(seed)
    return mx.random.normal((B, H, T, D)), mx.random.normal((B, H, T, D))


def _relative_error(a, b):
    """Per token (T,) of head 0: |a - b| / |b|."""
    return (mx.linalg.norm(a - b, axis=-1) / mx.linalg.norm(b, axis=-1))[0, 0]


@pytest.mark.parametrize("quant", ["affine", "codebook"])
def test_tokens_are_stored_with_the_bits_of_their_age(quant):
    """Oldest at the ring's 2 bits, the middle's 64 at 4 bits, the residual exact; fed
    token by token or in chunks, the storage is the same."""
    T = 300
    k, v = _data(T)
    one = QuantizedCache(**MIDDLE, quant=quant)
    for t in range(T):
        one.update_and_fetch(k[:, :, t:t + 1], v[:, :, t:t + 1])
    chunked = QuantizedCache(**MIDDLE, quant=quant)
    for i in range(0, T, 50):
        chunked.update_and_fetch(k[:, :, i:i + 50], v[:, :, i:i + 50])
        chunked.attend(mx.zeros((B, H, 50, D)), scale=0.1)
    lay = one.layout
    assert (lay.mid_len, lay.ring_len, lay.res_len) == (64, 192, 44)
    dk, dv = one.dequantized()
    ck, cv = chunked.dequantized()
    assert mx.array_equal(dk, ck).item() and mx.array_equal(dv, cv).item()
    err = _relative_error(dk, k)
    ring, middle, residual = err[:192], err[192:256], err[256:]
    assert middle.max().item() < ring.min().item()
    assert middle.mean().item() < 0.13 < 0.3 < ring.mean().item()
    assert residual.max().item() == 0.0
    st = one.layer_stats()
    assert st.kept_quantized == {2: 192, 4: 64} and st.kept_full == 44 and st.kept == T
    assert st.nbytes == sum(a.nbytes for _, a in tree_flatten(one.state))


@pytest.mark.parametrize("quant", ["affine", "codebook"])
def test_attention_over_ring_middle_and_residual_equals_its_dequantized_storage(quant):
    T, L, rep = 250, 9, 3
    k, v = _data(T + L, seed=1)
    cache = QuantizedCache(**MIDDLE, quant=quant)
    cache.update_and_fetch(k[:, :, :T], v[:, :, :T])
    q1 = mx.random.normal((B, H * rep, 1, D))
    cache._commit()
    dk, dv = cache.dequantized()
    assert mx.allclose(cache.attend(q1, scale=0.125), ref_attention(q1, dk, dv, 0.125), atol=1e-4).item()
    # a chunk of queries: causal within itself, over the same storage
    cache.update_and_fetch(k[:, :, T:], v[:, :, T:])
    qs = mx.random.normal((B, H * rep, L, D))
    out = cache.attend(qs, scale=0.125)
    fk = mx.concatenate([dk, k[:, :, T:]], axis=2)
    fv = mx.concatenate([dv, v[:, :, T:]], axis=2)
    mask = mx.arange(T + L)[None] <= (T + mx.arange(L))[:, None]
    assert mx.allclose(out, ref_attention(qs, fk, fv, 0.125, mask), atol=1e-4).item()


def test_trim_takes_the_residual_then_the_middle_then_the_ring():
    k, v = _data(200)
    cache = QuantizedCache(**MIDDLE, quant="codebook")
    cache.update_and_fetch(k, v)
    before = cache.dequantized()[0]
    lay = cache.layout
    res, mid = lay.res_len, lay.mid_len
    assert cache.trim(res + mid + 32) == res + mid + 32
    assert (lay.res_len, lay.mid_len, cache.offset) == (0, 0, 200 - res - mid - 32)
    assert mx.array_equal(cache.dequantized()[0], before[:, :, : cache.offset]).item()
    cache.update_and_fetch(k[:, :, :40], v[:, :, :40])  # and it goes on from there
    cache._commit()
    assert cache.size() == cache.offset


@pytest.mark.parametrize("policy", ["window", "snapkv"])
def test_eviction_works_on_top_of_the_middle(policy):
    """The ring evicts (by position or by score) only tokens that left the middle; the
    middle and residual are never evicted, and memory stays constant."""
    args = dict(window=200, sinks=4, **MIDDLE, quant="codebook")
    cache = (WindowCache(**args) if policy == "window"
             else ScoredCache(policy=make_policy(policy), recent=16, **args))
    sizes = []
    for i in range(12):
        k, v = _data(50, seed=i)
        cache.update_and_fetch(k, v)
        cache.attend(mx.random.normal((B, H * 2, 50, D)), scale=0.125)
        sizes.append(cache.layout.nbytes)  # (a policy's statistics vary by a few bytes)
    lay = cache.layout
    assert len(set(sizes[-4:])) == 1
    st = cache.layer_stats()
    assert st.seen == 600 and st.kept + st.evicted == 600 and st.evicted > 0
    assert st.kept_quantized[4] == 64 and st.kept_quantized[2] == lay.ring_len == cache.eviction.capacity == 128  # 120, whole units
    middle_first = lay.sinks + lay.flushed
    k_all, _ = cache.dequantized()
    assert k_all.shape[2] == st.kept
    if policy == "snapkv":  # per-head slots in position order, all older than the middle
        assert (cache.eviction.pos < middle_first).all().item()
        assert cache.eviction.tail.shape[-1] >= lay.mid_len + lay.res_len


def test_budget_accounts_for_the_middle_and_the_ring():
    model = tiny_model("llama")
    budget = 120_000
    plain = make_cache(model, CacheConfig(budget=budget, key_bits=2, value_bits=2, quant="codebook"))
    aged = make_cache(model, CacheConfig(budget=budget, key_bits=2, value_bits=2, quant="codebook",
                                         middle=96, residual=32))
    tokens = mx.array(list(range(5, 1005)))[None]
    for cache in (plain, aged):
        for i in range(0, tokens.shape[1], 200):
            model(tokens[:, i:i + 200], cache=cache)
            st = mlxkv.cache_stats(cache)
            assert st.nbytes <= budget and st.nbytes == sum(c.nbytes for c in cache)
    st_plain, st_aged = mlxkv.cache_stats(plain), mlxkv.cache_stats(aged)
    assert st_aged.nbytes > 0.9 * budget
    lay = aged[0].layout
    assert lay.middle == 96 and st_aged.layers[0].kept_quantized[4] == 96
    # the middle's 96 tokens at 4 bits cost the ring 2-bit slots: fewer tokens kept
    assert st_aged.kept < st_plain.kept
    # the bytes add up: fp sinks + residual buffers, the middle's buffer (96 + a group
    # it flushes at a time), the ring's slots
    per_token = lambda c: c.bytes_per_token(32, 4) * 2  # noqa: E731  (2 kv heads)
    assert lay.middle_unit == 32
    want = lay.full_nbytes + (96 + 32) * (per_token(lay.mkc) + per_token(lay.mvc)) \
        + lay.alloc * (per_token(lay.kc) + per_token(lay.vc))
    assert aged[0].nbytes == want


@pytest.mark.parametrize("words,needle", [
    (dict(middle=64), "middle only applies to a quantized cache"),
    (dict(bits=4, middle=64), r"middle_bits \(4\) must be more than the older tokens' bits \(4\)"),
    (dict(bits=2, middle=64, middle_bits=8, quant="codebook"), "middle_bits must be one of"),
    (dict(bits=2, middle=64, window=60), r"larger than the residual and middle \(64\)"),
    (dict(bits=2, middle=-1), "middle must be >= 0"),
])
def test_bad_middle_settings_are_clear_errors(words, needle):
    with pytest.raises(InputError, match=needle):
        settings.apply(CacheConfig(), words).check()


def test_turning_bits_off_turns_the_middle_off():
    config = settings.apply(CacheConfig(), dict(bits=2, middle=64))
    assert config.describe().startswith("K 2-bit (token) V 2-bit") and "4-bit middle 64" in config.describe()
    assert settings.apply(config, dict(bits="off")).middle == 0


@pytest.mark.parametrize("residual", [0, 16])
def test_the_prefill_rule_knows_what_the_ring_holds_after_any_token(residual):
    """A positional window lets a prompt chunk's queries see what the ring would hold had
    the tokens come one at a time: ``ring_flushed`` must match the real flushes."""
    args = dict(key_bits=2, value_bits=2, group_size=32, residual=residual, middle=48, quant="codebook")
    cache = WindowCache(window=200, sinks=4, **args)
    k, v = _data(300)
    for t in range(300):
        cache.update_and_fetch(k[:, :, t:t + 1], v[:, :, t:t + 1])
        lay = cache.layout
        assert lay.ring_flushed(mx.array(max(t + 1 - lay.sinks, 0))).item() == lay.flushed
        assert lay.mid_len < lay.middle + lay.middle_unit
        if lay.flushed:  # once the ring has tokens, the middle stays full
            assert lay.mid_len >= lay.middle


@pytest.mark.parametrize("allocator", ["adaptive", "pyramid"])
def test_allocators_split_a_budget_with_a_middle(allocator):
    """AdaKV's shared pool and PyramidKV's split work behind a middle: every layer keeps
    its middle, evicts from its ring, and the whole cache stays in the budget."""
    model = tiny_model("llama")
    budget = 80_000
    cache = make_cache(model, CacheConfig(budget=budget, key_bits=2, value_bits=2, quant="codebook",
                                          middle=64, policy="snapkv", allocator=allocator))
    tokens = mx.array([5 + (i * 7) % 500 for i in range(1500)])[None]
    for i in range(0, 1500, 100):
        model(tokens[:, i:i + 100], cache=cache)
        assert mlxkv.cache_stats(cache).nbytes <= budget
    for layer in mlxkv.cache_stats(cache).layers:
        assert layer.seen == 1500 and layer.kept + layer.evicted == 1500 and layer.evicted > 0
        assert 64 <= layer.kept_quantized[4] < 64 + 32
