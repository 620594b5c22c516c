"""mlxkv caches against float32 references and against mlx-lm's own caches."""

import mlx.core as mx
from mlx.utils import tree_flatten
import pytest
from mlx_lm.models.cache import KVCache

import mlxkv
from mlxkv.cache.base import CompressedCache
from mlxkv.cache.config import CacheConfig
from mlxkv.cache.make import make_cache
from mlxkv.cache.quantized import QuantizedCache
from mlxkv.cache.window import WindowCache
from mlxkv.errors import InputError

from conftest import tiny_model


def ref_attention(q, k, v, scale, mask=None):
    """Float32 softmax attention with GQA; mask (L, T) bool."""
    B, Hq, L, D = q.shape
    H = k.shape[1]
    q = q.astype(mx.float32).reshape(B, H, Hq // H, L, D)
    s = (q * scale) @ k.astype(mx.float32)[:, :, None].swapaxes(-1, -2)
    if mask is not None:
        s = mx.where(mask, s, -mx.inf)
    out = mx.softmax(s, axis=-1) @ v.astype(mx.float32)[:, :, None]
    return out.reshape(B, Hq, L, -1)


def causal(L, T):
    return (mx.arange(T)[None] <= (T - L + mx.arange(L))[:, None])


# Relative error of quantized attention vs float attention on Gaussian K/V (documented bounds).
ERROR_BOUNDS = {8: 0.02, 4: 0.15, 3: 0.3, 2: 0.6}


def _feed(cache, k, v, chunk):
    for i in range(0, k.shape[2], chunk):
        cache.update_and_fetch(k[:, :, i:i + chunk], v[:, :, i:i + chunk])
        if chunk > 1 and cache._pending is not None:
            cache._commit()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("mode", ["token", "channel"])
@pytest.mark.parametrize("T", [1, 2, 31, 33, 257])
def test_quantized_attention_matches_its_own_dequantized_storage(bits, mode, T):
    """The fused path (scores straight from packed storage) equals attention over the
    dequantized cache, and stays within the documented error of float attention."""
    mx.random.seed(T * 10 + bits)
    B, H, rep, D = 1, 2, 3, 64
    k, v = mx.random.normal((B, H, T, D)), mx.random.normal((B, H, T, D))
    q = mx.random.normal((B, H * rep, 1, D))
    cache = QuantizedCache(key_bits=bits, value_bits=bits, group_size=32, key_mode=mode)
    _feed(cache, k, v, 16)
    out = cache.attend(q, scale=D ** -0.5)
    dk, dv = cache.dequantized()
    assert dk.shape[2] == T
    assert mx.allclose(out, ref_attention(q, dk, dv, D ** -0.5), atol=1e-4).item()
    exact = ref_attention(q, k, v, D ** -0.5)
    err = (mx.linalg.norm(out - exact) / mx.linalg.norm(exact)).item()
    assert err < ERROR_BOUNDS[bits]


@pytest.mark.parametrize("gqa", [1, 3, 8])
@pytest.mark.parametrize("D", [64, 128])
def test_chunked_prefill_attention_with_residual_and_rotation(gqa, D):
    """A multi-token chunk over a cache holding sinks-less ring + residual + pending
    tokens: causal within the chunk, right against a float32 reference."""
    mx.random.seed(gqa + D)
    B, H, T, L = 1, 2, 100, 7
    k, v = mx.random.normal((B, H, T + L, D)), mx.random.normal((B, H, T + L, D))
    q = mx.random.normal((B, H * gqa, L, D))
    cache = QuantizedCache(key_bits=8, value_bits=8, group_size=64, residual=16, rotate=True)
    _feed(cache, k[:, :, :T], v[:, :, :T], 32)
    cache.update_and_fetch(k[:, :, T:], v[:, :, T:])
    out = cache.attend(q, scale=0.1)
    exact = ref_attention(q, k, v, 0.1, causal(L, T + L))
    assert (mx.linalg.norm(out - exact) / mx.linalg.norm(exact)).item() < 0.02
    assert cache.offset == T + L and cache.layout.res_len >= 16


def test_window_chunked_equals_token_by_token_and_sinks_stay_visible():
    mx.random.seed(0)
    B, H, D, T = 1, 2, 32, 90
    k, v = mx.random.normal((B, H, T, D)), mx.random.normal((B, H, T, D))
    qs = mx.random.normal((B, H, T, D))
    S, W = 4, 20
    one = WindowCache(window=W, sinks=S)
    outs = []
    for t in range(T):
        one.update_and_fetch(k[:, :, t:t + 1], v[:, :, t:t + 1])
        outs.append(one.attend(qs[:, :, t:t + 1], scale=0.2))
    token_by_token = mx.concatenate(outs, axis=2)
    chunked = WindowCache(window=W, sinks=S)
    parts = []
    for i in range(0, T, 32):
        chunked.update_and_fetch(k[:, :, i:i + 32], v[:, :, i:i + 32])
        parts.append(chunked.attend(qs[:, :, i:i + 32], scale=0.2))
    assert mx.allclose(mx.concatenate(parts, axis=2), token_by_token, atol=1e-5).item()
    # Reference: each query sees the sinks and its last W tokens.
    pos = mx.arange(T)
    mask = (pos[None] <= pos[:, None]) & ((pos[None] < S) | (pos[None] > pos[:, None] - W))
    assert mx.allclose(token_by_token, ref_attention(qs, k, v, 0.2, mask), atol=1e-5).item()
    assert one.nbytes == chunked.nbytes and one.size() == S + W


def test_quantized_window_keeps_memory_constant():
    mx.random.seed(1)
    cache = WindowCache(window=64, sinks=4, key_bits=4, value_bits=4, group_size=32,
                        key_mode="channel", residual=32)
    sizes = []
    for i in range(40):
        k = mx.random.normal((1, 2, 17, 64))
        cache.update_and_fetch(k, k)
        cache.attend(mx.random.normal((1, 4, 17, 64)), scale=0.1)
        sizes.append(cache.nbytes)
    assert len(set(sizes[10:])) == 1
    st = cache.layer_stats()
    assert st.kept + st.evicted == st.seen == 680
    assert st.kept <= 4 + 64 + 32


def _logits(model, cache, tokens, chunk):
    out = []
    for i in range(0, len(tokens), chunk):
        out.append(model(mx.array([tokens[i:i + chunk]]), cache=cache))
    return mx.concatenate(out, axis=1)


@pytest.mark.parametrize("arch,overrides", [
    ("qwen3", dict(head_dim=64, num_key_value_heads=1)),
    ("gemma2", dict(head_dim=32, num_key_value_heads=2, query_pre_attn_scalar=32,
                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    ("phi3", dict(num_key_value_heads=4, head_dim=None)),
])
def test_full_cache_equals_mlx_lm_kvcache_on_other_architectures(arch, overrides):
    model = tiny_model(arch, **overrides)
    tokens = list(range(3, 60))
    ours = make_cache(model, CacheConfig())
    theirs = [KVCache() for _ in model.layers]
    a = _logits(model, ours, tokens, 16)
    b = _logits(model, theirs, tokens, 16)
    assert mx.array_equal(a, b).item()


@pytest.mark.parametrize("arch,overrides", [
    ("qwen3", dict(head_dim=64, num_key_value_heads=1)),
    ("phi3", dict(num_key_value_heads=4, head_dim=None)),
])
def test_quantized_8bit_close_to_full_on_other_architectures(arch, overrides):
    model = tiny_model(arch, **overrides)
    tokens = list(range(3, 60))
    full = _logits(model, make_cache(model, CacheConfig()), tokens, 16)
    q8 = _logits(model, make_cache(model, CacheConfig(key_bits=8, value_bits=8, group_size=32)),
                 tokens, 16)
    assert mx.abs(full - q8).max().item() < 0.05 * mx.abs(full).max().item()


def test_full_cache_equals_mlx_lm_on_default_model(smollm, paris_prompt):
    model, tok = smollm
    a = _logits(model, make_cache(model), paris_prompt, 8)
    b = _logits(model, [KVCache() for _ in model.layers], paris_prompt, 8)
    assert mx.array_equal(a, b).item()


def test_8bit_greedy_matches_full_for_32_tokens(smollm):
    model, tok = smollm
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Write a short story about a lighthouse keeper."}],
        add_generation_prompt=True)

    def greedy(cache):
        ids = []
        for e in mlxkv.stream_generate(model, tok, prompt, max_tokens=32, cache=cache):
            ids.extend(e.tokens)
        return ids

    full = greedy(make_cache(model))
    q8 = greedy(make_cache(model, CacheConfig(key_bits=8, value_bits=8, group_size=32)))
    assert len(full) == 32 and q8 == full


def test_window_on_default_model_chunked_equals_token_by_token(smollm):
    model, tok = smollm
    tokens = tok.encode("The quick brown fox jumps over the lazy dog. " * 12)[:120]
    cfg = CacheConfig(window=40, sinks=4)
    a = _logits(model, make_cache(model, cfg), tokens, 1)
    b = _logits(model, make_cache(model, cfg), tokens, 32)
    assert mx.abs(a - b).max().item() < 1e-3


@pytest.mark.parametrize("prompt", [4096, pytest.param(20480, marks=pytest.mark.slow)])
def test_window_memory_constant_after_long_prompt(smollm, prompt):
    model, tok = smollm
    cache = make_cache(model, CacheConfig(window=252, sinks=4))
    tokens = mx.random.randint(0, 40000, (prompt,), key=mx.random.key(0))
    sizes = []
    for i in range(0, prompt, 512):
        model(tokens[None, i:i + 512], cache=cache)
        mx.eval([c.state for c in cache])
        sizes.append(sum(c.nbytes for c in cache))
    for t in range(8):
        model(mx.array([[t + 5]]), cache=cache)
        sizes.append(sum(c.nbytes for c in cache))
    assert len(set(sizes)) == 1
    st = mlxkv.cache_stats(cache)
    assert st.seen == prompt + 8 and st.kept == 256
    assert all(s.kept + s.evicted == s.seen for s in st.layers)


def test_routing_leaves_foreign_caches_on_mlx_lm_path(smollm, paris_prompt):
    model, _ = smollm
    assert mlxkv.route(model) == ["mlx_lm.models.llama"]  # mlxkv.load routed it already
    a = _logits(model, [KVCache() for _ in model.layers], paris_prompt, 8)
    b = _logits(model, make_cache(model), paris_prompt, 8)
    assert mx.array_equal(a, b).item()
    assert isinstance(make_cache(model, CacheConfig(window=8))[0], CompressedCache)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(key_bits=5), "key_bits"), (dict(group_size=48), "group_size"),
    (dict(key_bits=4, group_size=128), "does not divide"), (dict(key_mode="channel"), "needs key_bits"),
    (dict(residual=8), "residual only"), (dict(rotate=True), "rotate only"),
    (dict(window=0), "window must be"), (dict(window=64, start=10), "start applies"),
    (dict(window=16, key_bits=4, residual=32), "larger than the residual"),
])
def test_impossible_configs_are_clear_errors(smollm, kwargs, needle):
    model, _ = smollm
    with pytest.raises(InputError, match=needle):
        make_cache(model, CacheConfig(**kwargs))


def test_trim_and_stats_of_quantized_cache():
    cache = QuantizedCache(key_bits=4, value_bits=4, group_size=32, residual=32)
    x = mx.random.normal((1, 2, 100, 64))
    cache.update_and_fetch(x, x)
    cache._commit()
    st = cache.layer_stats()
    assert st.seen == 100 and st.kept_quantized == {4: 64} and st.kept_full == 36
    assert st.nbytes == cache.nbytes == sum(a.nbytes for _, a in tree_flatten(cache.state))
    assert cache.trim(40) == 40 and cache.offset == 60
    dk, _ = cache.dequantized()
    assert dk.shape[2] == 60


def test_query_blocks_bound_the_score_matrix_without_changing_results():
    mx.random.seed(5)
    k, v = mx.random.normal((1, 2, 300, 64)), mx.random.normal((1, 2, 300, 64))
    q = mx.random.normal((1, 6, 45, 64))
    outs = []
    for block in (1 << 22, 2 * 3 * 300 * 4):  # one block; blocks of 4 queries
        cache = WindowCache(window=100, sinks=4, key_bits=4, value_bits=4, group_size=32)
        _feed(cache, k[:, :, :255], v[:, :, :255], 64)
        cache.block_elements = block
        cache.update_and_fetch(k[:, :, 255:], v[:, :, 255:])
        outs.append(cache.attend(q, scale=0.125))
    assert mx.allclose(outs[0], outs[1], atol=1e-5).item()


@pytest.mark.parametrize("head_dim,group", [(32, 32), (64, 64), (96, 32), (128, 64)])
def test_default_group_size_fits_the_head_dim(head_dim, group):
    """No group size given: 64 where it divides the head dim, else the largest that does."""
    model = tiny_model("llama", head_dim=head_dim)
    config = CacheConfig(key_bits=4, value_bits=4)
    cache = make_cache(model, config)
    assert cache[0].layout.kc.group == cache[0].layout.vc.group == group
    assert f"group {group}" in config.resolve(head_dim).describe()
    assert "group auto" in config.describe()
    logits = model(mx.array([[1, 2, 3, 4, 5]]), cache=cache)
    assert mx.isfinite(logits).all().item()


def test_head_dim_without_a_supported_group_is_a_clear_error():
    model = tiny_model("llama", head_dim=80)
    with pytest.raises(InputError, match="no supported group size .* divides the head dim 80"):
        make_cache(model, CacheConfig(key_bits=4, value_bits=4))
    make_cache(model, CacheConfig(window=64))  # full precision still works
    with pytest.raises(InputError, match="group_size 64 does not divide the head dim 96"):
        make_cache(tiny_model("llama", head_dim=96), CacheConfig(key_bits=4, group_size=64))


def test_bench_configs_use_the_models_own_head_dim():
    """Qwen3 declares head_dim (128) apart from hidden_size // heads (here 32)."""
    from mlxkv.presets import cache_factories

    model = tiny_model("qwen3", head_dim=128)
    factories = cache_factories(model)
    assert factories["mlx-lm Quantized 4-bit"]()[0].group_size == 64
    assert factories["mlxkv 4-bit"]()[0].layout.kc.group == 64


def test_learned_attention_sinks_are_refused_with_a_way_out():
    """gpt-oss adds learned sink logits to its attention: compressed caches refuse it up
    front, naming what to use instead; the full cache stays on mlx-lm's path."""
    model = tiny_model("gpt_oss", num_local_experts=2, num_experts_per_tok=1, sliding_window=16,
                       layer_types=["sliding_attention", "full_attention"], intermediate_size=64,
                       swiglu_limit=7.0)
    with pytest.raises(InputError, match="gpt_oss models have learned attention sinks.*full cache"):
        make_cache(model, CacheConfig(key_bits=4, value_bits=4))
    cache = make_cache(model, CacheConfig())
    assert mx.isfinite(model(mx.array([[1, 2, 3]]), cache=cache)).all().item()


def test_bad_kernel_mode_is_reported_when_the_cache_is_made(monkeypatch):
    monkeypatch.setenv("MLXKV_KERNELS", "fast")
    with pytest.raises(InputError, match="MLXKV_KERNELS='fast' is not a kernel mode.*auto, metal, reference"):
        make_cache(tiny_model("llama"), CacheConfig(key_bits=4, value_bits=4))


def test_routing_is_explicit_and_reversible():
    from mlx_lm.models import base, llama

    from mlxkv.cache import route

    model = tiny_model("llama")  # routed by the fixture, as mlxkv.load does
    users = route._USERS["mlx_lm.models.llama"]
    assert llama.scaled_dot_product_attention is not base.scaled_dot_product_attention
    mlxkv.unroute(model)
    assert route._USERS["mlx_lm.models.llama"] == users - 1
    if users == 1:  # no other routed llama in this process: mlx-lm's function is back
        assert llama.scaled_dot_product_attention is base.scaled_dot_product_attention
    with pytest.raises(InputError, match="not routed.*mlxkv.route\\(model\\)"):
        make_cache(model, CacheConfig(key_bits=4, value_bits=4))
    make_cache(model, CacheConfig())  # mlx-lm's path needs no routing
    mlxkv.route(model)
    assert route._USERS["mlx_lm.models.llama"] == users
    assert llama.scaled_dot_product_attention is not base.scaled_dot_product_attention
    assert isinstance(make_cache(model, CacheConfig(window=8))[0], CompressedCache)


def test_hand_routed_mlx_lm_model_saves_and_reloads_its_cache(tmp_path):
    """A model built by mlx-lm and routed by hand (no ``mlxkv.load``) has a shape (its
    identity included), so its compressed cache saves and loads back with the same
    next-token logits."""
    from mlx_lm.models import llama

    from mlxkv.persist import load_cache, save_cache

    args = llama.ModelArgs(model_type="llama", hidden_size=128, num_hidden_layers=2,
                           intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                           rms_norm_eps=1e-5, vocab_size=256, head_dim=32,
                           tie_word_embeddings=True)
    mx.random.seed(3)
    model = llama.Model(args)
    mx.eval(model.parameters())
    mlxkv.route(model)
    shape = mlxkv.shape_of(model)
    assert (shape.name, shape.head_dim, shape.kv_heads, shape.gqa) == ("llama", 32, 2, 2)
    assert shape.attention_layers == (0, 1) and shape.identity["layers"] == 2
    config = CacheConfig(key_bits=4, value_bits=4, group_size=32, residual=16)
    cache = make_cache(model, config)
    prompt = list(range(3, 83))
    model(mx.array(prompt)[None], cache=cache)
    path = save_cache(tmp_path / "c.safetensors", cache, model=model, config=config, tokens=prompt)
    loaded, got_config, tokens, _ = load_cache(path, model)
    assert tokens == prompt and got_config.key_bits == 4
    step = mx.array([[7]])
    want = model(step, cache=cache)
    got = model(step, cache=loaded)
    assert mx.array_equal(want, got)


@pytest.mark.parametrize("config", [dict(key_bits=4, value_bits=4, group_size=32),
                                    dict(window=40, sinks=4, key_bits=4, value_bits=4, group_size=32,
                                         policy="snapkv"),
                                    dict()])
@pytest.mark.parametrize("kernels", ["reference", "metal"])
def test_one_decode_decision_per_layer_per_step(config, kernels, monkeypatch, kernels_built_by,
                                                simulator):
    """A decode step decides once per layer (``fused.decide``: the fused kernel or
    segments, and where the new token goes), in ``update_and_fetch``; ``attend`` consumes it."""
    from mlxkv.cache import fused

    monkeypatch.setenv("MLXKV_KERNELS", kernels)
    if kernels == "metal" and not mx.metal.is_available():
        kernels_built_by(simulator.metal_kernel)
    model = tiny_model("llama")
    cache = make_cache(model, CacheConfig(**config))
    model(mx.array([list(range(1, 61))]), cache=cache)
    decisions = []
    real = fused.decide
    monkeypatch.setattr(fused, "decide", lambda *a: decisions.append(a) or real(*a))
    steps = 5
    for t in range(steps):
        mx.eval(model(mx.array([[7 + t]]), cache=cache))
    compressed = sum(isinstance(c, CompressedCache) for c in cache)
    assert len(decisions) == steps * compressed
    if kernels == "metal" and compressed:  # the kernel takes the step and stores its token
        assert all(d[2] is not None for d in decisions)


def test_plan_sizes_what_make_cache_builds_and_the_server_reserves():
    from mlxkv.cache.layout import STEP
    from mlxkv.cache.plan import GROWTH_SLACK

    model = tiny_model("llama")
    shape = mlxkv.shape_of(model)
    budgeted = mlxkv.plan(CacheConfig(budget="300KB", key_bits=4, value_bits=4), shape)
    cache = make_cache(model, budgeted)
    assert [c.window for c in cache] == [lp.window for lp in budgeted.layers]
    assert sum(lp.budget for lp in budgeted.layers) == 300_000
    assert budgeted.bound_bytes(10_000, 512) == 300_000
    assert f"(keeps {budgeted.layers[0].window} tokens + 4 sinks a layer)" in budgeted.describe()
    # no budget: every kept token at full precision, rounded up to the buffers' steps,
    # plus a chunk, the sinks and the residual (a bound, not an estimate)
    grow = mlxkv.plan(CacheConfig(key_bits=4, value_bits=4, residual=16), shape)
    token = 2 * shape.kv_heads * shape.head_dim * 4  # float32
    rows = -(-1000 // STEP) * STEP + 512 + STEP + 4 + 16 + GROWTH_SLACK
    assert grow.bound_bytes(1000, 512) == 2 * rows * token
    other = tiny_model("llama", num_hidden_layers=3)
    with pytest.raises(InputError, match="plan was made for another model"):
        make_cache(other, budgeted)


def test_route_keeps_a_models_name_and_a_dtype_set_later_reaches_its_caches():
    model = tiny_model("llama")
    mlxkv.unroute(model)
    mlxkv.route(model, name="my-llama")
    mlxkv.unroute(model)
    mlxkv.route(model)
    assert mlxkv.shape_of(model).identity["name"] == "my-llama"
    model.set_dtype(mx.float16)
    cache = make_cache(model, CacheConfig(key_bits=8, value_bits=8, group_size=32))
    assert mlxkv.shape_of(model).dtype == mx.float16
    model(mx.array([[1, 2, 3]]), cache=cache)
    assert cache[0].layout.sink_keys.dtype == mx.float16


def test_restoring_a_state_between_a_decode_steps_store_and_attend_drops_the_step(
        monkeypatch, kernels_built_by, simulator):
    """A state put back after ``update_and_fetch`` took a decode token the kernel was to
    store: ``attend`` then decides anew and stores nothing of the dropped token."""
    monkeypatch.setenv("MLXKV_KERNELS", "metal")
    if not mx.metal.is_available():
        kernels_built_by(simulator.metal_kernel)
    cache = QuantizedCache(key_bits=4, value_bits=4, group_size=32)
    k, v = mx.random.normal((1, 2, 40, 32)), mx.random.normal((1, 2, 40, 32))
    cache.update_and_fetch(k, v)
    cache.attend(mx.random.normal((1, 4, 40, 32)), scale=0.2)
    state, meta = cache.state, cache.meta_state
    cache.update_and_fetch(k[:, :, :1], v[:, :, :1])  # the kernel would store this one
    cache.state, cache.meta_state = state, meta
    cache.attend(mx.random.normal((1, 4, 1, 32)), scale=0.2)
    assert cache.meta_state == meta and cache.layout.ring_len == 40
