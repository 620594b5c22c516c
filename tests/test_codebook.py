"""The codebook codec (rotation + Lloyd-Max codes + one scale per vector): references in
float32 first, then the codec against them, by bits, at odd lengths and head dims."""

import mlx.core as mx
import numpy as np
import pytest

import mlxkv
from conftest import tiny_model
from mlxkv.cache.codebook import CodebookCodec, lloyd_max
from mlxkv.cache.codec import AffineCodec, make_codec
from mlxkv.cache.config import CacheConfig
from mlxkv.cache.make import make_cache
from mlxkv.errors import InputError
from mlxkv.persist import load_cache, save_cache


def ref_scores(q, k):
    return q.astype(mx.float32) @ k.astype(mx.float32).swapaxes(-1, -2)


def ref_weighted(p, v):
    return p.astype(mx.float32) @ v.astype(mx.float32)


def ref_lookup(planes, widths, levels):
    """levels[code] per element, the codes read bit by bit from their planes (float32)."""
    words = [np.array(p) for p in planes]
    code, low = 0, 0
    for w, width in zip(words, widths):
        per = 32 // width
        fields = (w[..., :, None] >> (np.arange(per, dtype=np.uint32) * width)) & ((1 << width) - 1)
        code = code + (fields.reshape(*w.shape[:-1], -1).astype(np.int64) << low)
        low += width
    return np.array(levels, np.float32)[code]


def rel_mse(a, b):
    return (mx.sum((a - b) ** 2) / mx.sum(b ** 2)).item()


def keys_like(shape, seed=0):
    """Gaussian vectors with a few large channels, as attention keys have."""
    mx.random.seed(seed)
    scale = np.ones(shape[-1], np.float32)
    scale[[3, 17, -2]] = (9.0, 12.0, 6.0)
    return mx.random.normal(shape) * mx.array(scale)


# relative MSE of a round trip, by bits (Lloyd-Max for N(0, 1): 0.1175, 0.0345, 0.0095)
BOUND = {2: 0.12, 3: 0.037, 4: 0.011}
TOL = {mx.float32: 1e-4, mx.float16: 2e-2, mx.bfloat16: 5e-2}


def test_lloyd_max_levels_are_the_gaussian_ones_for_wide_heads():
    for bits, known in ((1, [0.7979]), (2, [0.4528, 1.5104])):
        levels, bounds = lloyd_max(bits, 4096)
        assert np.allclose(levels, -levels[::-1])  # symmetric
        assert np.allclose(levels[len(levels) // 2:], known, atol=2e-3)
        assert np.all(np.diff(bounds) > 0) and len(bounds) == 2 ** bits - 1


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,D", [(1, 64), (7, 64), (33, 128), (5, 96)])
def test_round_trip_error_is_bounded_by_bits_and_below_affine(bits, n, D):
    x = keys_like((1, 2, n, D), seed=bits * 100 + n)
    c = CodebookCodec(bits)
    state = c.alloc(1, 2, n, D, mx.float32)
    c.write(state, 0, x)
    err = rel_mse(c.decode(state), x)
    # few vectors are noisy estimates of the mean error: allow for it at n = 1
    assert err < BOUND[bits] * (2.5 if n * 2 < 8 else 1.3)
    if D % 64 == 0 and n >= 7:
        a = AffineCodec(bits, 64)
        sa = a.alloc(1, 2, n, D, mx.float32)
        a.write(sa, 0, x)
        assert err < rel_mse(a.decode(sa), x)  # and it stores no scales or biases per group


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_attention_over_codes_matches_the_decoded_reference(bits, dtype):
    n, D = 37, 64
    x = keys_like((1, 3, n, D), seed=bits).astype(dtype)
    c = CodebookCodec(bits)
    state = c.alloc(1, 3, n, D, dtype)
    c.write(state, 0, x)
    dense = c.decode(state)
    q = mx.random.normal((1, 3, 4, D)).astype(dtype)
    p = mx.softmax(mx.random.normal((1, 3, 4, n)), axis=-1).astype(dtype)
    scale = mx.abs(ref_scores(q, dense)).max().item()
    assert mx.abs(c.scores(q, state).astype(mx.float32) - ref_scores(q, dense)).max().item() <= TOL[dtype] * scale
    vscale = mx.abs(dense).max().item()
    assert mx.abs(c.weighted(p, state).astype(mx.float32) - ref_weighted(p, dense)).max().item() <= TOL[dtype] * vscale


def test_storage_is_bits_plus_one_half_scale_per_vector():
    for bits in (2, 3, 4):
        c = CodebookCodec(bits)
        state = c.alloc(2, 3, 256, 64, mx.float32)
        assert sum(a.nbytes for a in state) == 2 * 3 * 256 * c.bytes_per_token(64, 4)
        assert c.bytes_per_token(64, 4) * 8 / 64 == bits + 0.25  # 16-bit scale over 64 elements
        # slots written in pieces read back the same as written at once
        x = keys_like((2, 3, 10, 64))
        c.write(state, 0, x[:, :, :4])
        c.write(state, 4, x[:, :, 4:])
        whole = c.alloc(2, 3, 10, 64, mx.float32)
        c.write(whole, 0, x)
        assert all(mx.array_equal(a, b) for a, b in zip(c.slots(state, 10), whole))


def test_the_sign_sketch_makes_key_scores_unbiased_at_one_more_bit():
    """TurboQuant's second stage on keys: E[score] = q.k. (At this head size it adds more
    variance than it removes bias: the eval table measures what that does.)"""
    x = keys_like((1, 1, 4000, 64), seed=5)
    q = mx.random.normal((1, 1, 1, 64))
    true = ref_scores(q, x)
    for bits in (2, 3):
        c = CodebookCodec(bits, sketch=True)
        assert c.bytes_per_token(64, 4) == CodebookCodec(bits).bytes_per_token(64, 4) + 64 / 8 + 2
        state = c.alloc(1, 1, 4000, 64, mx.float32)
        c.write(state, 0, x)
        err = c.scores(q, state) - true
        spread = mx.sqrt(mx.mean(err ** 2)).item()
        assert abs(mx.mean(err).item()) < 4 * spread / np.sqrt(4000)  # mean within noise


def test_outliers_keep_each_keys_largest_value_and_cut_its_error():
    x = keys_like((1, 2, 200, 64), seed=3)  # a few channels far larger than the rest
    q = mx.random.normal((1, 2, 4, 64))
    for bits in (2, 3):
        plain, kept = CodebookCodec(bits), CodebookCodec(bits, outliers=1)
        assert kept.bytes_per_token(64, 4) == plain.bytes_per_token(64, 4) + 3  # uint8 + float16
        state = kept.alloc(1, 2, 200, 64, mx.float32)
        kept.write(state, 0, x)
        assert sum(a.nbytes for a in state) == 2 * 200 * kept.bytes_per_token(64, 4)
        channel, value = state[-2:]
        largest = mx.argmax(mx.abs(x), axis=-1)
        assert mx.array_equal(channel[..., 0].astype(mx.int32), largest).item()
        want = mx.take_along_axis(x, largest[..., None], axis=-1).astype(mx.float16)
        assert mx.array_equal(value, want).item()
        decoded = kept.decode(state)
        assert rel_mse(decoded, x) < 0.6 * rel_mse(plain.decode(plain.encode(x)), x)
        # scores read from the storage (codes + the kept values) are those of the decode
        assert mx.allclose(kept.scores(q, state), ref_scores(q, decoded), atol=1e-4).item()
    with pytest.raises(ValueError, match="keys"):
        kept.weighted(mx.ones((1, 2, 4, 200)), state)


def test_config_checks_and_settings_words():
    from mlxkv import settings

    assert make_codec(3, 64, quant="codebook") == CodebookCodec(3)
    config = settings.apply(CacheConfig(), {"kv_bits": 3, "kv_quant": "codebook"}).resolve(64)
    assert config.describe() == "K 3-bit V 3-bit codebook"
    for bad, why in (({"key_bits": 8, "quant": "codebook"}, "codebook key_bits must be one of"),
                     ({"key_bits": 3, "quant": "codebook", "key_mode": "channel"}, "per token"),
                     ({"key_bits": 3, "quant": "vq"}, "quant must be one of"),
                     ({"key_bits": 3, "sketch": True}, "sketch applies to codebook keys"),
                     ({"key_bits": 3, "outliers": 1}, "outliers apply to codebook keys"),
                     ({"value_bits": 3, "quant": "codebook", "outliers": 1}, "outliers apply"),
                     ({"key_bits": 3, "quant": "codebook", "outliers": 9}, "0 to 8 per key")):
        with pytest.raises(InputError, match=why):
            CacheConfig(**bad).check(64)
    with pytest.raises(InputError, match="head dim of 2"):
        CacheConfig(key_bits=3, value_bits=3, quant="codebook").check(80)


def test_codebook_caches_grow_save_and_hold_a_budget(tmp_path):
    model = tiny_model("llama")  # head dim 32, 2 kv heads, float32
    prompt = mx.random.randint(0, 512, (300,)).tolist()
    config = CacheConfig(key_bits=3, value_bits=3, quant="codebook", residual=32, outliers=1)
    grow = make_cache(model, config)
    model(mx.array(prompt)[None], cache=grow)
    st = mlxkv.cache_stats(grow)
    assert st.kept == 300 and st.layers[0].kept_quantized.get(3, 0) >= 256
    save_cache(tmp_path / "c.safetensors", grow, model=model, config=config, tokens=prompt)
    loaded, _, tokens, _ = load_cache(tmp_path / "c.safetensors", model)
    step = mx.array([[7]])
    assert tokens == prompt and mx.allclose(model(step, cache=grow), model(step, cache=loaded)).item()
    budget = CacheConfig(key_bits=2, value_bits=2, quant="codebook", budget=20_000, policy="snapkv")
    cache = make_cache(model, budget)
    for i in range(0, 300, 64):
        model(mx.array(prompt[i:i + 64])[None], cache=cache)
    st = mlxkv.cache_stats(cache)
    assert st.nbytes <= 20_000 and st.evicted > 0
    # a budget of codebook codes holds more tokens than the same budget of affine ones
    affine = make_cache(model, budget.replace(quant="affine"))
    for i in range(0, 300, 64):
        model(mx.array(prompt[i:i + 64])[None], cache=affine)
    assert st.kept > mlxkv.cache_stats(affine).kept


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n", [1, 5, 300])
@pytest.mark.parametrize("table", ["lloyd-max", "asymmetric"])
def test_the_references_expand_the_table_exactly(bits, n, table):
    """The CPU references read codes as a sum over their bits (the table's Walsh
    expansion, compiled once for every length) instead of a lookup: the same values,
    for any table, not only symmetric ones."""
    from mlxkv.kernels import codebook_attention as ka
    from mlxkv.cache.codebook import PLANES

    c = CodebookCodec(bits)
    state = c.encode(keys_like((1, 2, n, 64), seed=n))
    levels = (mx.array(lloyd_max(bits, 64)[0], dtype=mx.float32) if table == "lloyd-max"
              else mx.random.normal((2 ** bits,), key=mx.random.key(bits)))
    subsets, _ = ka.walsh(np.array(levels, np.float64), bits)
    if table == "lloyd-max":  # only odd terms: 2, 4, 8 of them
        assert all(len(S) % 2 for S in subsets) and len(subsets) == {2: 2, 3: 4, 4: 8}[bits]
    got = ka.unscaled_vectors(planes=list(state[:-1]), widths=PLANES[bits], levels=levels)
    want = ref_lookup(state[:-1], PLANES[bits], levels)
    assert got.shape == (1, 2, n, 64)
    assert np.abs(np.array(got) - want).max() <= 1e-5 * (1 + np.abs(want).max())


# ----- the Metal kernels, through the strict simulator (the GPU on a Mac) -------------------
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,M", [(1, 1), (7, 3), (5, 8), (300, 1)])  # M: query rows per kv head
def test_codebook_kernels_match_their_references(metal_sim, bits, dtype, n, M):
    from mlxkv.cache.codebook import PLANES, _tables
    from mlxkv.kernels import codebook_attention as ka

    D = 64
    c = CodebookCodec(bits)
    state = c.alloc(1, 2, n, D, dtype)
    c.write(state, 0, keys_like((1, 2, n, D), seed=n).astype(dtype))
    parts = dict(planes=list(state[:-1]), widths=PLANES[bits], scale=state[-1],
                 levels=_tables(bits, D, 0)[0])
    q = mx.random.normal((1, 2, M, D)).astype(dtype)
    p = mx.softmax(mx.random.normal((1, 2, M, n)), axis=-1).astype(dtype)
    got_s = ka.codebook_scores_metal(q=q, **parts)
    got_w = ka.codebook_weighted_metal(p=p, **parts)
    want_s = ka.codebook_scores_reference(q=q.astype(mx.float32), **parts)
    want_w = ka.codebook_weighted_reference(p=p.astype(mx.float32), **parts)
    assert got_s.dtype == dtype and got_w.shape == (1, 2, M, D)
    tol = TOL[dtype]
    assert mx.abs(got_s.astype(mx.float32) - want_s).max().item() <= tol * (1 + mx.abs(want_s).max().item())
    assert mx.abs(got_w.astype(mx.float32) - want_w).max().item() <= tol * (1 + mx.abs(want_w).max().item())


@pytest.mark.parametrize("config", [
    CacheConfig(key_bits=3, value_bits=2, quant="codebook"),
    # a 4-bit middle before the ring, keys with an outlier kept
    CacheConfig(key_bits=2, value_bits=2, quant="codebook", middle=32, outliers=1),
])
def test_a_codebook_cache_decodes_alike_on_the_kernels_and_the_reference(metal_sim, monkeypatch,
                                                                        config):
    model = tiny_model("llama")
    prompt = mx.array(list(range(40, 140)))[None]
    outs = {}
    for mode in ("reference", "metal"):
        monkeypatch.setenv("MLXKV_KERNELS", mode)
        cache = make_cache(model, config)
        model(prompt, cache=cache)
        outs[mode] = model(mx.array([[5]]), cache=cache)
        assert cache[0].layout.ring_len and (cache[0].layout.mid_len or not config.middle)
    assert mx.allclose(outs["metal"], outs["reference"], atol=1e-4).item()
    if metal_sim is not None:
        assert metal_sim.launches["codebook_scores"] > 0 and metal_sim.launches["codebook_weighted"] > 0


def test_prompt_chunks_score_sketched_keys_with_their_sketch():
    """A chunk of queries reads the ring dequantized, except keys whose scores are more
    than their decode (the sketch): those are scored from their storage, as in decoding."""
    from mlxkv.cache.quantized import QuantizedCache

    for sketch in (False, True):
        c = QuantizedCache(key_bits=2, value_bits=2, group_size=64, quant="codebook", sketch=sketch)
        c.update_and_fetch(*(keys_like((1, 2, 40, 64)),) * 2)
        c.attend(mx.zeros((1, 2, 40, 64)), scale=0.125)
        c.update_and_fetch(*(keys_like((1, 2, 3, 64), seed=1),) * 2)
        ring = c.segments(dense_after=mx.zeros((1,)))[0]
        assert (ring.key_codec == c.layout.kc) == sketch and ring.value_codec.bits is None
