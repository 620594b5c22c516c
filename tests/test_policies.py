"""Eviction policies under a budget: invariants for every policy x allocator, scores that
come from the attention itself, and passkey retrieval on the real default model."""

import random

import mlx.core as mx
import pytest

import mlxkv
from mlxkv import CacheConfig, make_cache
from mlxkv.cache.config import ALLOCATORS
from mlxkv.cache.plan import allocate
from mlxkv.cache.scored import ScoredCache
from mlxkv.errors import InputError
from mlxkv.evaluation import passkey_prompt
from mlxkv.policies import POLICIES, KnormPolicy, TOVAPolicy
from mlxkv.policies.snapkv import avg_pool

from conftest import tiny_model


def _feed(model, cache, n, chunk, seed=0):
    tokens = mx.random.randint(0, model.args.vocab_size, (n,), key=mx.random.key(seed))
    for s in range(0, n, chunk):
        model(tokens[None, s : s + chunk], cache=cache)
        mx.eval([c.state for c in cache])
        yield s + chunk


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_invariants_every_policy_and_allocator(policy, allocator):
    model = tiny_model("llama", num_hidden_layers=4)
    budget = 160_000
    config = CacheConfig(budget=budget, key_bits=4, value_bits=4, group_size=32,
                         policy=policy, allocator=allocator)
    if allocator == "adaptive" and policy == "window":  # nothing to share slots by
        with pytest.raises(InputError, match="adaptive allocator .* scoring policy"):
            make_cache(model, config)
        return
    cache = make_cache(model, config)
    assert sum(c.budget for c in cache) == budget
    if allocator == "pyramid":
        assert cache[0].budget > cache[-1].budget and cache[0].eviction.capacity > cache[-1].eviction.capacity
    for _ in _feed(model, cache, 700, 37):
        stats = mlxkv.cache_stats(cache)
        assert stats.nbytes <= budget and stats.budget == budget
        for c, s in zip(cache, stats.layers):
            assert s.kept + s.evicted == s.seen and c.layout.n_sinks == 4
    assert all(s.evicted > 0 for s in stats.layers)
    for c in cache:
        if allocator == "adaptive":  # one pool: heads' shares vary, each in position order
            counts = c.head_counts()
            assert sum(counts) == c.layout.ring_len == len(counts) * c.eviction.capacity
            assert min(counts) >= int(c.eviction.slots.floor * c.eviction.capacity)
            heads, pos = c.eviction.head[0, 0], c.eviction.pos[0, 0]
            assert (heads[1:] >= heads[:-1]).all().item() and (pos >= 4).all().item()
            same = heads[1:] == heads[:-1]
            assert mx.all(mx.where(same, pos[1:] > pos[:-1], True)).item()
        elif policy != "window":
            pos = c.eviction.pos[0]
            assert (pos >= 4).all().item()  # sinks live apart and are never in the ring
            assert (pos[:, 1:] > pos[:, :-1]).all().item()  # each head in position order
    logits = model(mx.array([[1, 2, 3]]), cache=cache)
    assert mx.isfinite(logits).all().item()


def test_kept_tokens_are_the_top_scoring_ones():
    B, H, D, T = 1, 2, 32, 300
    c = ScoredCache(policy=KnormPolicy(), recent=8, window=64, sinks=4)
    mx.random.seed(3)
    keys = mx.random.normal((B, H, T, D)) * mx.random.uniform(0.2, 3.0, (B, H, T, 1))
    for t in range(T):
        c.update_and_fetch(keys[:, :, t : t + 1], keys[:, :, t : t + 1])
    norms = mx.linalg.norm(keys, axis=-1)[0]
    for h in range(H):
        kept = set(c.eviction.pos[0, h].tolist())
        recent = set(range(T - 8, T))
        older = sorted(range(4, T - 8), key=lambda p: norms[h, p].item())
        assert kept == recent | set(older[: c.eviction.capacity - 8])
        held = mx.take(keys[0, h], mx.array(sorted(kept)), axis=0)
        assert mx.allclose(c.layout.ring_keys[0][0, h], held).item()


def test_attention_scores_come_from_the_attention_itself():
    """TOVA's slot scores after a decode step are exactly the attention the query gave
    each ring slot (summed over the query heads of the kv head)."""
    B, H, rep, D = 1, 2, 3, 32
    c = ScoredCache(policy=TOVAPolicy(), recent=4, window=24, sinks=4)
    mx.random.seed(1)
    kv = mx.random.normal((B, H, 60, D))
    for t in range(60):
        k = kv[:, :, t : t + 1]
        c.update_and_fetch(k, k)
        c.attend(mx.random.normal((B, H * rep, 1, D)), scale=D**-0.5)
    q = mx.random.normal((B, H * rep, 1, D))
    k_new = mx.random.normal((B, H, 1, D))
    c.update_and_fetch(k_new, k_new)
    ring_keys = c.layout.ring_keys[0]
    all_keys = mx.concatenate([c.layout.sink_keys[..., : c.layout.n_sinks, :], ring_keys], axis=2)
    c.attend(q, scale=D**-0.5)
    ref = mx.softmax((q.reshape(B, H, rep, D) * D**-0.5) @ all_keys.swapaxes(-1, -2), axis=-1)
    expected = ref[..., c.layout.n_sinks :].sum(axis=2)
    assert mx.allclose(c.eviction.score, expected, atol=1e-5).item()


def test_avg_pool_and_allocator():
    x = mx.array([[0.0, 0, 3, 0, 0, 6]])
    assert avg_pool(x, 3).tolist() == [[0.0, 1.0, 1.0, 1.0, 2.0, 2.0]]
    assert avg_pool(x, 1).tolist() == x.tolist()
    for n in (1, 7, 30):
        for a in ALLOCATORS:
            shares = allocate(1_000_003, n, a)
            assert sum(shares) == 1_000_003 and len(shares) == n
    pyr = allocate(3000, 3, "pyramid")
    assert pyr[0] > pyr[1] > pyr[2]


@pytest.mark.parametrize("changes,needle", [
    (dict(policy="nope", window=64), "unknown policy 'nope' \\(known: window, h2o, knorm, snapkv, tova"),
    (dict(policy="h2o"), "evicts from a window or budget cache"),
    (dict(policy="h2o", window=64, key_bits=4, key_mode="channel"), "keys must be grouped per token"),
    (dict(allocator="flat", budget="1MB"), "unknown allocator 'flat' \\(known: uniform, pyramid, adaptive"),
    (dict(allocator="adaptive", budget="1MB"), "adaptive allocator .* choose a scoring policy"),
    (dict(policy="snapkv:windw=8", budget="1MB"),
     "policy 'snapkv' has no parameter 'windw' \\(its parameters: window=16, kernel=3\\)"),
    (dict(policy="h2o:window=8", budget="1MB"), "policy 'h2o' has no parameter 'window' .*none"),
    (dict(policy="snapkv:window=x", budget="1MB"), "window takes a number, as in snapkv:window=16"),
    (dict(policy="snapkv", budget="1MB", recent=-1), "recent must be >= 0"),
    (dict(policy="snapkv", budget="1MB", allocator="adaptive", floor=1.5), "floor is a share"),
    (dict(policy="snapkv:window=0", budget="1MB"), "snapkv's window and kernel are at least 1"),
    (dict(budget="1MB", recent=8), "recent applies to a scoring policy"),
    (dict(policy="h2o", budget="1MB", floor=0.5), "floor applies to the adaptive allocator"),
])
def test_bad_policy_settings(changes, needle):
    with pytest.raises(InputError, match=needle):
        CacheConfig(**changes).check()


def test_passkey_outside_the_window_at_a_quarter_budget(smollm, capsys):
    """The key sits well before the recent window; the budget holds a quarter of the
    prompt's fp KV. SnapKV keeps the tokens the question attends to; the window can't."""
    model, tok = smollm
    L = 1000
    budget = int(0.25 * L * 30 * 2 * 3 * 64 * 4)  # layers x (K, V) x heads x dim x fp32
    rng = random.Random(0)
    configs = {"window": dict(policy="window"), "snapkv": dict(policy="snapkv"),
               # reported, not asserted: they do not retrieve on this model (see README)
               "h2o": dict(policy="h2o"),
               "snapkv adaptive": dict(policy="snapkv", allocator="adaptive")}
    found = dict.fromkeys(configs, 0)
    for trial in range(4):
        key = rng.randrange(10000, 99999)
        prompt = passkey_prompt(tok, L, (0.1, 0.3, 0.5, 0.7)[trial], key)
        for policy, fields in configs.items():
            cache = make_cache(model, CacheConfig(budget=budget, **fields))
            reply = mlxkv.generate(model, tok, prompt, max_tokens=8, cache=cache,
                                   prefill_step=len(prompt))
            found[policy] += str(key) in reply
            assert mlxkv.cache_stats(cache).nbytes <= budget
    with capsys.disabled():
        print(f"\npasskey at a 25% budget, 4 trials: {found}")
    assert found["window"] == 0 and found["snapkv"] >= 2


@pytest.mark.parametrize("policy", ["h2o", "snapkv"])
def test_scored_cache_save_load_round_trip(policy, tmp_path):
    from mlxkv.persist import load_cache, save_cache

    model = tiny_model("llama", num_hidden_layers=2)
    config = CacheConfig(budget=60_000, key_bits=8, value_bits=8, group_size=32, policy=policy)
    cache = make_cache(model, config)
    for _ in _feed(model, cache, 300, 50):
        pass
    save_cache(tmp_path / "c.safetensors", cache, model=model, config=config, tokens=list(range(300)))
    loaded, _, _, _ = load_cache(tmp_path / "c.safetensors", model)
    x = mx.array([[5, 6]])
    assert mx.array_equal(model(x, cache=cache), model(x, cache=loaded)).item()
    assert mx.array_equal(cache[0].eviction.score, loaded[0].eviction.score).item()


def test_adaptive_allocation_follows_the_scores_and_attention_is_per_head():
    """Knorm scores head 0's keys (small norms) far above head 1's: head 1 keeps only its
    guaranteed floor and head 0 takes the rest of the layer's slots; attention over the
    shared pool equals per-head attention over what each head kept."""
    from mlxkv.cache.adaptive import AdaptiveScoredCache

    B, H, rep, D, T = 1, 2, 3, 32, 300
    c = AdaptiveScoredCache(policy=KnormPolicy(), recent=8, window=64, sinks=4, floor=0.25)
    mx.random.seed(0)
    scale = mx.array([0.3, 3.0]).reshape(1, H, 1, 1)
    keys, values = mx.random.normal((B, H, T, D)) * scale, mx.random.normal((B, H, T, D))
    for t in range(T):
        c.update_and_fetch(keys[:, :, t : t + 1], values[:, :, t : t + 1])
    floor = int(0.25 * c.eviction.capacity)
    assert c.head_counts() == [H * c.eviction.capacity - floor, floor]
    stats = c.layer_stats()
    assert stats.kept == 4 + c.eviction.capacity + c.layout.res_len and stats.kept + stats.evicted == T
    q = mx.random.normal((B, H * rep, 1, D))
    out = c.attend(q, scale=D**-0.5)
    heads, pos = c.eviction.head[0, 0].tolist(), c.eviction.pos[0, 0].tolist()
    for h in range(H):
        held = mx.array(list(range(4)) + [p for p, g in zip(pos, heads) if g == h]
                        + list(range(T - c.layout.res_len, T)))
        k, v = keys[0, h][held], values[0, h][held]
        want = mx.softmax(q[0, h * rep : (h + 1) * rep, 0] @ k.T * D**-0.5, axis=-1) @ v
        assert mx.allclose(out[0, h * rep : (h + 1) * rep, 0], want, atol=1e-5).item()


def test_adaptive_cache_save_load_round_trip(tmp_path):
    from mlxkv.persist import load_cache, save_cache

    model = tiny_model("llama", num_hidden_layers=2)
    config = CacheConfig(budget=60_000, key_bits=8, value_bits=8, group_size=32,
                         policy="snapkv", allocator="adaptive")
    cache = make_cache(model, config)
    for _ in _feed(model, cache, 300, 50):
        pass
    save_cache(tmp_path / "c.safetensors", cache, model=model, config=config, tokens=list(range(300)))
    loaded, _, _, _ = load_cache(tmp_path / "c.safetensors", model)
    assert loaded[0].head_counts() == cache[0].head_counts()
    x = mx.array([[5, 6]])
    assert mx.array_equal(model(x, cache=cache), model(x, cache=loaded)).item()


def test_adaptive_allocator_with_a_batch_is_refused_up_front():
    model = tiny_model("llama")
    config = CacheConfig(budget=160_000, key_bits=4, value_bits=4, policy="snapkv",
                         allocator="adaptive")
    with pytest.raises(InputError, match="batch size 1, got 2.*'uniform' or 'pyramid'"):
        make_cache(model, config, batch_size=2)
    cache = make_cache(model, config)  # made for one sequence, then fed two
    with pytest.raises(InputError, match="batch size 1, got 2"):
        model(mx.zeros((2, 3), mx.int32), cache=cache)


def test_policy_parameters_and_kept_tokens_reach_the_caches():
    """SnapKV's observation window and pooling, the recent tokens kept and AdaKV's floor
    are settings like any other: a flag, a word, a saved config."""
    from mlxkv import settings
    from mlxkv.cache.adaptive import AdaptiveScoredCache

    model = tiny_model("llama")
    config = settings.apply(CacheConfig(), {"kv_budget": "200KB", "kv_bits": 8,
                                            "kv_policy": "SnapKV:window=8, kernel=5",
                                            "kv_recent": "12", "kv_allocator": "adaptive",
                                            "kv_floor": "0.5"}).check()
    cache = make_cache(model, config)
    layer = cache[0]
    assert isinstance(layer, AdaptiveScoredCache)
    policy = layer.eviction.policy
    assert (policy.name, policy.window, policy.kernel) == ("snapkv", 8, 5)
    assert layer.eviction.recent == 12 and layer.eviction.slots.floor == 0.5
    assert "policy snapkv:window=8,kernel=5" in config.describe()
    assert "12 recent kept" in config.describe() and "floor 0.5" in config.describe()
    assert CacheConfig(**config.to_dict()) == config  # what a saved cache records
    default = make_cache(model, CacheConfig(budget="200KB", key_bits=8, value_bits=8,
                                            policy="snapkv"))[0]
    assert (default.eviction.policy.window, default.eviction.recent) == (16, 32)


def test_a_policy_has_one_spelling():
    """Equal settings are equal configs (the server compares them, saved caches record
    them): the policy and its parameters are kept in one spelling."""
    a = CacheConfig(policy=" SnapKV: window = 8 ,kernel=5", budget="1MB")
    assert a == CacheConfig(policy="snapkv:window=8,kernel=5", budget="1MB")
    assert a.policy_name == "snapkv" and a.check().describe().endswith("policy snapkv:window=8,kernel=5")
    assert CacheConfig(policy="Window").policy == "window"
