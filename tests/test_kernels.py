"""Every kernel in metal_kernels/ against its pure-MLX reference, through the CPU
simulator of Metal (``mlxkv.metalsim``). References compute in float32."""

import re
from importlib import import_module

import mlx.core as mx
import numpy as np
import pytest

import mlxkv
from mlxkv.errors import InputError
from mlxkv.kernels import QuantizedKV, _metal

# the kernel modules (their packages export the dispatchers under the same names)
sdpa_quantized = import_module("mlxkv.kernels.sdpa_quantized")
quantize_rows = import_module("mlxkv.kernels.quantize_rows")

# max |kernel - reference| allowed, relative to max |reference| (float32 accumulation
# in the kernel; the output is rounded to the dtype)
TOL = {mx.float32: 2e-5, mx.float16: 2e-3, mx.bfloat16: 1.6e-2}


def close(got, want, dtype):
    got, want = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
    assert not np.isnan(got).any(), "NaN in the kernel output (unwritten or poisoned)"
    err = np.abs(got - want).max()
    assert err <= TOL[dtype] * max(1.0, np.abs(want).max()), f"max error {err}"


def make_ring(B, H, n, D, DV, *, bits, group, mode, dtype, alloc=None, seed=0):
    """A quantized ring of n used slots (of ``alloc``) in mlxkv's codec layout."""
    alloc = alloc or -(-max(n, 1) // 64) * 64
    k0 = mx.random.normal((B, H, alloc, D), key=mx.random.key(seed)).astype(dtype)
    v0 = mx.random.normal((B, H, alloc, DV), key=mx.random.key(seed + 1)).astype(dtype)
    keys = mx.quantize(k0 if mode == "token" else k0.swapaxes(-1, -2), group_size=group, bits=bits)
    values = mx.quantize(v0, group_size=group, bits=bits)
    return QuantizedKV(keys=keys, values=values, length=n, key_bits=bits, key_group=group,
                       value_bits=bits, value_group=group, key_mode=mode)


def attention_case(*, B=1, H=2, rep=3, L=1, D=64, DV=None, n=33, nf=5, bits=4, group=32,
                   mode="token", dtype=mx.float32, seed=0):
    DV = DV or D
    ring = make_ring(B, H, n, D, DV, bits=bits, group=group, mode=mode, dtype=dtype, seed=seed) if n else None
    r = lambda shape, s: mx.random.normal(shape, key=mx.random.key(seed + s)).astype(dtype)  # noqa: E731
    return dict(q=r((B, H * rep, L, D), 7), scale=D ** -0.5, ring=ring,
                float_keys=r((B, H, nf, D), 8), float_values=r((B, H, nf, DV), 9))


def run_both(case, passes, mass_rows=None, new=None):
    """(kernel, reference) results (``Fused``) of one attention call."""
    got = sdpa_quantized.sdpa_quantized_metal(**case, passes=passes, mass_rows=mass_rows, new=new)
    want = sdpa_quantized.sdpa_quantized_reference(**case, mass_rows=mass_rows, new=new)
    return got, want


# ----- fused attention ---------------------------------------------------------------
@pytest.mark.parametrize("mode", ["token", "channel"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("passes", [1, 2])
def test_sdpa_bits_and_key_modes(metal_sim, bits, mode, passes):
    case = attention_case(bits=bits, mode=mode, n=64 if mode == "channel" else 33)
    got, want = run_both(case, passes)
    close(got.out, want.out, mx.float32)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
def test_sdpa_head_dims_and_dtypes(metal_sim, D, dtype):
    case = attention_case(D=D, dtype=dtype, group=64, n=70, nf=3)
    got, want = run_both(case, 1)
    close(got.out, want.out, dtype)


@pytest.mark.parametrize("rep", [1, 3, 8])
@pytest.mark.parametrize("n", [1, 2, 31, 33, 257, 4097])
def test_sdpa_cache_lengths_and_gqa(metal_sim, n, rep):
    case = attention_case(rep=rep, n=n, H=1 if n > 257 else 2, nf=0 if n == 1 else 2)
    got = sdpa_quantized.sdpa_quantized(**case)  # the dispatcher: two passes past 512 tokens
    close(got, sdpa_quantized.sdpa_quantized_reference(**case).out, mx.float32)


def test_sdpa_chunk_is_causal_and_masked_rows_are_zero(metal_sim):
    # L = 4 query rows over only 2 float tokens and no ring: rows 0 and 1 see nothing.
    case = attention_case(L=4, n=0, nf=2)
    for passes in (1, 2):
        got, want = run_both(case, passes)
        close(got.out, want.out, mx.float32)
        assert np.all(np.array(got.out)[:, :, :2] == 0)
    case = attention_case(L=3, n=40, nf=6)
    got, want = run_both(case, 1)
    close(got.out, want.out, mx.float32)


def test_sdpa_attention_mass_in_the_same_launches(metal_sim):
    rep = 3
    case = attention_case(L=2, n=45, nf=4, rep=rep)
    for passes in (1, 2):
        for rows in [(0, 2), (1, 2)]:
            got, want = run_both(case, passes, mass_rows=rows)
            close(got.out, want.out, mx.float32)
            close(got.mass, want.mass, mx.float32)
            assert got.mass.shape == (1, 2, 49)
            # each observed row spreads a total mass of 1 per query head
            assert np.allclose(np.array(got.mass).sum(-1), rep * (rows[1] - rows[0]), atol=1e-4)
            # row 0 cannot see row 1's token: the last token's mass comes from row 1 only
            if rows == (1, 2):
                assert np.array(got.mass)[..., -1].min() > 0


@pytest.mark.parametrize("nr", [0, 3])  # sinks alone; sinks then a residual
def test_sdpa_reads_sinks_and_residual_where_they_are(metal_sim, nr):
    """Sinks come as their own inputs (a cache joins nothing per step): the same result
    as attention over the ring, then the sinks and the residual joined."""
    case = attention_case(n=300, nf=nr, rep=3)
    B, H, _, D = case["float_keys"].shape
    sinks = tuple(mx.random.normal((B, H, 4, D), key=mx.random.key(20 + i)) for i in range(2))
    for passes in (1, 2):
        got, want = run_both(dict(case, sinks=sinks), passes, mass_rows=(0, 1),
                             new=new_token(case, [[3, 299]]))
        close(got.out, want.out, mx.float32)
        close(got.mass, want.mass, mx.float32)
        assert got.mass.shape == (B, H, 300 + 4 + nr)
        joined = dict(case, float_keys=mx.concatenate([sinks[0], case["float_keys"]], axis=2),
                      float_values=mx.concatenate([sinks[1], case["float_values"]], axis=2))
        close(got.out, sdpa_quantized.sdpa_quantized_reference(
            **joined, new=new_token(case, [[3, 299]])).out, mx.float32)


def test_sdpa_split_partials_do_not_overflow_float16(metal_sim):
    """Pass 1 stores each block's output in the input dtype: unnormalized, flat scores
    over values near v sum to (block length) * v, inf in float16 past 65504 (at 32k
    tokens, blocks of 4096 and values near 17). Here blocks of 151 tokens and values near
    1000; normalized by the block's own sum the partials stay near 1000."""
    case = attention_case(dtype=mx.float16, n=0, nf=301, H=1, rep=2)
    case["q"] = mx.zeros_like(case["q"])  # flat scores
    case["float_values"] = case["float_values"] + 1000
    assert sdpa_quantized.split(case["q"], case["float_keys"], None, passes=2) == 2
    got, want = run_both(case, 2)
    assert np.isfinite(np.array(got.out.astype(mx.float32))).all()
    close(got.out, want.out, mx.float16)


def test_split_blocks_are_capped():
    """However few (batch, group, row) threadgroups there are, a split's blocks hold at
    most MAX_BLOCK tokens (128k tokens and 64 kv heads made blocks of 64k)."""
    for H, n in [(1, 300), (8, 32768), (32, 131072), (64, 131072), (128, 131072)]:
        q, fk = mx.zeros((1, H, 1, 64)), mx.zeros((1, H, 1, 64))
        ring = QuantizedKV(keys=(), values=(), length=n, key_bits=4, key_group=64,
                           value_bits=4, value_group=64)  # split reads its length only
        nb = sdpa_quantized.split(q, fk, ring)
        assert -(-(n + 1) // nb) <= sdpa_quantized.MAX_BLOCK, (H, n, nb)


def new_token(case, slot, seed=5):
    """A new decode token for ``case`` (its ring) taking ring slot ``slot`` (B, H)."""
    B, H, _, D = case["float_keys"].shape
    DV = case["float_values"].shape[-1]
    r = lambda shape, s: (mx.random.normal(shape, key=mx.random.key(seed + s)) * 2).astype(case["q"].dtype)  # noqa: E731
    return sdpa_quantized.NewToken(keys=r((B, H, 1, D), 0), values=r((B, H, 1, DV), 1),
                                   slot=mx.array(slot, mx.int32))


@pytest.mark.parametrize("bits,group,D,dtype", [(4, 32, 64, mx.float32), (3, 64, 64, mx.float32),
                                                (2, 32, 128, mx.float32), (8, 64, 128, mx.float16),
                                                (4, 128, 128, mx.bfloat16)])
@pytest.mark.parametrize("passes", [1, 2])
def test_sdpa_quantizes_the_new_token_itself(metal_sim, bits, group, D, dtype, passes):
    """A decode step's new token is quantized inside the attention launch: its codes equal
    mx.quantize's (on the CPU simulator; within a step on a Mac), and the output is that
    of attention over the ring with those codes in the token's slot (per kv head its own
    slot: a replaced one, or one past the end of the storage)."""
    case = attention_case(D=D, bits=bits, group=group, dtype=dtype, n=300, nf=3, rep=3)
    ring = case["ring"]
    # storage of exactly `length - 1` slots (a scored ring growing by one)
    trimmed = tuple(a[:, :, :299] for a in ring.keys), tuple(a[:, :, :299] for a in ring.values)
    cases = {"replace": (ring, [[7, 290]]),
             "append": (ring, [[299, 299]]),
             "past the storage": (sdpa_quantized.QuantizedKV(
                 keys=trimmed[0], values=trimmed[1], length=300, key_bits=bits, key_group=group,
                 value_bits=bits, value_group=group), [[299, 299]])}
    for name, (r, slot) in cases.items():
        c = dict(case, ring=r)
        new = new_token(c, slot)
        got, want = run_both(c, passes, mass_rows=(0, 1), new=new)
        close(got.out, want.out, dtype)
        close(got.mass, want.mass, dtype)  # from scores over keys dequantized in dtype
        assert_new_token_stored_as_mx_quantize(got, want, group, bits, dtype)


def assert_new_token_stored_as_mx_quantize(got, want, group, bits, dtype):
    """The new token's codes from the kernel (``Fused.new_keys``/``new_values``) against
    mx.quantize's: within a quantization step, the same codes on the CPU simulator."""
    for mine, ref in ((got.new_keys, want.new_keys), (got.new_values, want.new_values)):
        assert [a.shape for a in mine] == [a.shape for a in ref]
        deq = mx.dequantize(*mine, group_size=group, bits=bits)
        rdeq = mx.dequantize(*ref, group_size=group, bits=bits)
        step = np.repeat(np.abs(np.array(ref[1].astype(mx.float32))), group, axis=-1)
        assert np.all(np.abs(np.array((deq - rdeq).astype(mx.float32))) <= step * 1.01 + 1e-6)
        if not mx.metal.is_available():  # the CPU simulator: the same codes as mx.quantize
            assert np.array_equal(np.array(mine[0]), np.array(ref[0]))
            close(mine[1], ref[1], dtype)
            close(mine[2], ref[2], dtype)


# Head dims of MLX models whose D / 32 elements per lane do not divide the quantization
# group (96: Phi-3, 160, 192: a lane's elements straddle two groups), with 64 and 128 as
# controls: single pass without a new token, two passes with one (its codes stored).
@pytest.mark.parametrize("D,group,bits,dtype,H,rep", [
    (64, 32, 4, mx.float32, 2, 2), (96, 32, 4, mx.float32, 1, 1),
    (128, 64, 3, mx.float16, 2, 3), (160, 32, 3, mx.float32, 2, 2),
    (192, 32, 4, mx.bfloat16, 1, 4), (192, 64, 2, mx.float32, 2, 1)])
def test_sdpa_head_dims_whose_lanes_straddle_groups(metal_sim, D, group, bits, dtype, H, rep):
    case = attention_case(D=D, group=group, bits=bits, dtype=dtype, H=H, rep=rep, n=37,
                          nf=1 if H == 1 else 3)
    assert sdpa_quantized.fused_available(case["ring"], case["q"], case["float_keys"],
                                          case["float_values"], new=True)
    got, want = run_both(case, 1)
    close(got.out, want.out, dtype)
    new = new_token(case, [[36, 5][:H]])  # the last slot, and one replaced
    got, want = run_both(case, 2, new=new)
    close(got.out, want.out, dtype)
    assert_new_token_stored_as_mx_quantize(got, want, group, bits, dtype)


def test_sdpa_layouts_the_kernel_does_not_take_fall_back(metal_sim):
    """Every head dim of MLX's models with every group size dividing it is taken by the
    kernel except D = 80 (a lane would own 2.5 elements; no group size divides it, so
    only full-precision tokens can reach it): that one takes the reference, launching
    nothing."""
    for D in (64, 80, 96, 128, 160, 192, 256):
        for group in (g for g in quantize_rows.GROUP_SIZES if D % g == 0):
            case = attention_case(D=D, group=group)
            assert sdpa_quantized.fused_available(case["ring"], case["q"], case["float_keys"],
                                                  case["float_values"], new=True), (D, group)
    case = attention_case(D=80, n=0, nf=5, rep=2)
    assert not sdpa_quantized.fused_available(None, case["q"], case["float_keys"],
                                              case["float_values"])
    if metal_sim is not None:
        before = sum(metal_sim.launches.values())
    got = sdpa_quantized.sdpa_quantized(**case)
    if metal_sim is not None:
        assert sum(metal_sim.launches.values()) == before
    close(got, sdpa_quantized.sdpa_quantized_reference(**case).out, mx.float32)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sdpa_same_result_in_shuffled_schedules(kernels_built_by, simulator, monkeypatch, seed):
    from mlxkv.metalsim import Simulator

    shuffled = Simulator(seed=seed, cache=simulator.cache)
    kernels_built_by(shuffled.metal_kernel)
    case = attention_case(n=300, nf=3, rep=2)
    for passes in (1, 2):
        got, want = run_both(case, passes, mass_rows=(0, 1), new=new_token(case, [[5, 200]]))
        close(got.out, want.out, mx.float32)
        close(got.mass, want.mass, mx.float32)


# ----- quantize -------------------------------------------------------------------------
@pytest.mark.parametrize("bits,group,dtype", [(2, 64, mx.float32), (3, 64, mx.float32),
                                              (4, 64, mx.float32), (8, 64, mx.float32),
                                              (4, 32, mx.float32), (4, 128, mx.float32),
                                              (4, 64, mx.float16), (4, 64, mx.bfloat16)])
def test_quantize_rows_matches_mx_quantize(metal_sim, bits, group, dtype):
    x = (mx.random.normal((2, 3, 5, 128), key=mx.random.key(bits)) * 3).astype(dtype)
    w, s, b = quantize_rows.quantize_rows(x, bits=bits, group_size=group)
    rw, rs, rb = mx.quantize(x, group_size=group, bits=bits)
    assert w.shape == rw.shape and s.shape == rs.shape and w.dtype == mx.uint32
    if not mx.metal.is_available():  # MLX's CPU mx.quantize: same scales and biases
        close(s, rs, dtype)
        close(b, rb, dtype)
    deq = mx.dequantize(w, s, b, group_size=group, bits=bits)
    ref = mx.dequantize(rw, rs, rb, group_size=group, bits=bits)
    step = np.repeat(np.abs(np.array(rs.astype(mx.float32))), group, axis=-1)
    assert np.all(np.abs(np.array((deq - ref).astype(mx.float32))) <= step * 1.01 + 1e-6)
    if dtype == mx.float32 and not mx.metal.is_available():  # same rounding as CPU mx.quantize
        assert np.array_equal(np.array(w), np.array(rw))


# ----- the dispatchers ----------------------------------------------------------------
def test_dispatch_uses_reference_without_metal(monkeypatch):
    monkeypatch.delenv("MLXKV_KERNELS", raising=False)
    assert _metal.use_metal(True) == mx.metal.is_available()  # auto: Metal when there is one
    monkeypatch.setenv("MLXKV_KERNELS", "metal")
    assert _metal.use_metal(True) and not _metal.use_metal(False)
    monkeypatch.setenv("MLXKV_KERNELS", "reference")
    assert not _metal.use_metal(True)
    monkeypatch.setenv("MLXKV_KERNELS", "gpu")
    with pytest.raises(InputError, match="MLXKV_KERNELS"):
        _metal.use_metal(True)


def test_unsupported_shape_falls_back_to_reference(metal_sim):
    case = attention_case(bits=6, n=10)  # 6-bit codes: no kernel for them
    assert not sdpa_quantized.fused_available(case["ring"], case["q"], case["float_keys"],
                                              case["float_values"])
    if metal_sim is not None:
        before = sum(metal_sim.launches.values())
        got = sdpa_quantized.sdpa_quantized(**case)
        assert sum(metal_sim.launches.values()) == before
    got = sdpa_quantized.sdpa_quantized(**case)
    close(got, sdpa_quantized.sdpa_quantized_reference(**case).out, mx.float32)


@pytest.mark.parametrize("n", [0, 2])  # no ring (dummy inputs), a ring of 2 tokens
def test_no_input_is_bound_in_the_constant_address_space(kernels_built_by, metal_sim, monkeypatch, n):
    """MLX binds inputs under 8 elements as ``const constant``; the kernels read every
    input through ``device`` pointers, which Apple's compiler cannot bind to those. The
    generated signatures of every launch (ring-less and tiny rings, with a new token and
    the attention mass, quantize_rows on tiny shapes) have device pointers only."""
    if metal_sim is None:
        pytest.skip("on a Mac the real compiler checks this")
    signatures = []
    simulate = metal_sim.metal_kernel

    def recording(**spec):
        kernel = simulate(**spec)

        def launch(**call):
            signatures.append(kernel.spec.msl_source(call["inputs"], call["output_dtypes"],
                                                     call.get("template") or []))
            return kernel(**call)
        return launch

    kernels_built_by(recording)
    case = attention_case(B=1, H=1, rep=1, n=n, nf=1, D=32, group=32)
    got, mass = sdpa_quantized.sdpa_quantized(**case, mass_rows=(0, 1))
    want = sdpa_quantized.sdpa_quantized_reference(**case, mass_rows=(0, 1))
    close(got, want.out, mx.float32)
    close(mass, want.mass, mx.float32)
    count = 2
    if n:  # the new token in one pass, and in a split (both passes on tiny inputs)
        for passes in (1, 2):
            got, want = run_both(case, passes, mass_rows=(0, 1), new=new_token(case, [[1]]))
            close(got.out, want.out, mx.float32)
            close(got.mass, want.mass, mx.float32)
            count += passes
    w, _, _ = quantize_rows.quantize_rows(mx.ones((1, 32)), bits=8, group_size=32)
    assert w.shape == (1, 8)
    assert len(signatures) == count
    for text in signatures:
        assert "const device" in text and not re.search(r"constant [\w:<>]+\s*\*", text), text


def test_kernel_failing_on_the_device_falls_back_to_reference_with_a_warning(kernels_built_by, monkeypatch):
    # What a Mac user gets if Apple's compiler rejects a kernel: a warning, the right
    # answer from the reference, and the kernel turned off for the rest of the process.
    monkeypatch.delenv("MLXKV_KERNELS", raising=False)
    monkeypatch.setattr(_metal, "_FAILED", {})
    monkeypatch.setattr(_metal, "_CHECKED", set())
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    calls = []

    def rejecting_compiler(**spec):
        def launch(**kwargs):
            calls.append(spec["name"])
            raise RuntimeError("[metal::Device] Unable to build metal library from source")
        return launch

    kernels_built_by(rejecting_compiler)
    case = attention_case(n=40)
    with pytest.warns(RuntimeWarning, match="sdpa_quantized failed on this device"):
        got = sdpa_quantized.sdpa_quantized(**case)
    close(got, sdpa_quantized.sdpa_quantized_reference(**case).out, mx.float32)
    assert calls == ["sdpa_quantized"]
    assert not sdpa_quantized.fused_available(case["ring"], case["q"], case["float_keys"],
                                              case["float_values"])
    sdpa_quantized.sdpa_quantized(**case)
    assert calls == ["sdpa_quantized"]  # not tried again
    # another instantiation of the same kernel is its own: tried (and here refused too)
    with pytest.warns(RuntimeWarning, match="STATS=True"):
        sdpa_quantized.sdpa_quantized(**case, mass_rows=(0, 1))
    assert calls == ["sdpa_quantized", "sdpa_quantized"]


# ----- end to end: the default model on the simulated Metal path ----------------------------
@pytest.mark.parametrize("config", [
    dict(key_bits=4, value_bits=4),
    dict(key_bits=2, value_bits=2, key_mode="channel", residual=32),
    dict(key_bits=4, value_bits=4, budget="4MB", policy="snapkv"),
])
def test_model_greedy_tokens_same_on_metal_path(kernels_built_by, smollm, simulator, monkeypatch, config):
    model, tok = smollm
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "The tide rises and falls twice a day. " * 8
          + "Write two sentences about the sea and the moon."}],
        add_generation_prompt=True)  # long enough to fill a ring past KIVI's residual
    cfg = mlxkv.CacheConfig(**config)
    monkeypatch.setenv("MLXKV_KERNELS", "reference")
    want = mlxkv.generate(model, tok, prompt, max_tokens=6, cache=mlxkv.make_cache(model, cfg))
    monkeypatch.setenv("MLXKV_KERNELS", "metal")
    if not mx.metal.is_available():
        kernels_built_by(simulator.metal_kernel)
    cache = mlxkv.make_cache(model, cfg)  # compiles its kernels (preflight)
    before = simulator.launches.copy()
    got = mlxkv.generate(model, tok, prompt, max_tokens=6, cache=cache)
    assert got == want
    if mx.metal.is_available():
        return  # ran on the GPU: nothing to count
    ran = simulator.launches - before
    steps = 5 * len(model.layers)  # decode steps after the prompt's, every layer
    if config.get("key_mode") == "channel":  # KIVI keys: MLX's quantized matmuls, for now
        assert ran["sdpa_quantized"] == 0 and ran["quantize_rows"] > 0
        return
    assert ran["sdpa_quantized"] >= steps
    # the decode steps quantize their tokens inside the attention (the quantizer ran for
    # the prompt only: far fewer launches than decode steps)
    assert 0 < ran["quantize_rows"] < steps


# ----- mlxkv bench --kernels ----------------------------------------------------------------
def test_bench_kernels_cli_on_the_simulator(tmp_path, monkeypatch, capsys):
    import json

    from mlxkv.cli import main

    monkeypatch.setenv("MLXKV_CACHE_DIR", str(tmp_path))  # the simulator's compile cache
    out = tmp_path / "kernels.json"
    assert main(["bench", "--kernels", "--simulate", "--kernel-lengths", "40", "600",
                 "--kernel-repeats", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = doc["kernels"]
    assert [r["length"] for r in rows] == [40, 600]  # one single-pass, one two-pass length
    for r in rows:
        assert r["max_error"] < 1e-2 and r["quantization_error"] < 0.2
        assert r["quantized_kv_mb"] < r["fp16_kv_mb"] / 3 and r["speedup"] > 0
    # the simulator's counts: every cache byte read at least once, per GQA ratio and length
    traffic = doc["traffic"]
    assert [(t["gqa"], t["length"]) for t in traffic] == [(g, n) for g in (1, 3, 4, 8) for n in (40, 600)]
    for t in traffic:
        assert t["read_mb"] >= t["packed_mb"] and t["launches"] == (1 if t["length"] == 40 else 2)
        # the attention mass costs no launch; a split call's second pass reads the scores
        # (a single pass reads back what its threadgroup wrote: not counted as traffic)
        assert t["mass_launches"] == t["launches"] and t["ratio"] <= t["mass_ratio"]
        assert (t["ratio"] < t["mass_ratio"]) == (t["launches"] == 2)
    assert min(t["ratio"] for t in traffic if t["gqa"] == 1) < 1.3
    launches = doc["launches_per_layer_step"]
    # a decode step: the attention's one or two launches, nothing else (the new token's
    # quantizer and a scoring policy's attention mass are inside them)
    assert launches == {"4-bit, 200 tokens": 1, "4-bit window snapkv, 200 tokens": 1,
                        "4-bit, 1024 tokens": 2, "4-bit window snapkv, 1024 tokens": 2}
    printed = capsys.readouterr().out
    assert "x sdpa" in printed and "    600" in printed and "read/packed" in printed


def test_bench_kernels_needs_metal_or_simulate(capsys, monkeypatch):
    from mlxkv.cli import main

    monkeypatch.delenv("MLXKV_KERNELS", raising=False)
    assert main(["bench", "--kernels", "--kernel-lengths", "64"]) == 2
    assert "needs a Metal device" in capsys.readouterr().err
    assert main(["bench", "--kernels", "--simulate", "--kernel-bits", "5"]) == 2
    assert "argument --kernel-bits: invalid choice: 5" in capsys.readouterr().err


@pytest.mark.parametrize("config", [dict(key_bits=4, value_bits=4),
                                    dict(key_bits=4, value_bits=4, window=600, policy="snapkv")])
def test_make_cache_compiles_every_decode_kernel_before_generation(kernels_built_by, simulator, monkeypatch, config):
    """auto mode on a 'Mac' (the simulator as its GPU): each kernel instantiation a decode
    step uses, the two-pass variant past 512 tokens included, is compiled and checked when
    the cache is made, so generation itself checks (compiles) nothing new."""
    from conftest import tiny_model

    monkeypatch.delenv("MLXKV_KERNELS", raising=False)
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    kernels_built_by(simulator.metal_kernel)
    monkeypatch.setattr(_metal, "_CHECKED", set())
    monkeypatch.setattr(_metal, "_FAILED", {})
    model = tiny_model("llama")
    cache = mlxkv.make_cache(model, mlxkv.CacheConfig(group_size=32, **config))
    ready = set(_metal._CHECKED)
    names = {name for name, _ in ready}
    assert {"quantize_rows", "sdpa_quantized", "sdpa_quantized_pass1", "sdpa_quantized_pass2"} <= names
    # decode tokens go straight into the ring: the attention quantizes them itself
    attention = {name: template for name, template in ready if name.startswith("sdpa")}
    assert all("('NEW', True)" in t for n, t in attention.items() if n != "sdpa_quantized_pass2")
    assert all(("('STATS', True)" in t) == ("policy" in config) for t in attention.values())
    prompt = mx.random.randint(0, 512, (1, 560), key=mx.random.key(1))
    logits = model(prompt, cache=cache)
    for _ in range(3):
        logits = model(mx.argmax(logits[:, -1:], axis=-1), cache=cache)
    mx.eval(logits)
    assert simulator.launches["sdpa_quantized_pass1"] > 1  # the decode steps ran two-pass
    assert _metal._CHECKED == ready and not _metal._FAILED


def test_codebook_preflight_compiles_what_codebook_attention_uses(kernels_built_by, simulator, monkeypatch):
    """auto mode on a 'Mac' (the simulator as its GPU): ``codebook_preflight`` compiles
    and checks both codebook kernels for a codec's planes, dtype and head dim, so
    attention over codebook codes of any length then compiles nothing new. Without
    Metal it does nothing."""
    from mlxkv.cache.codebook import PLANES, CodebookCodec
    from mlxkv.kernels import codebook_preflight

    monkeypatch.delenv("MLXKV_KERNELS", raising=False)
    kernels_built_by(simulator.metal_kernel)
    monkeypatch.setattr(_metal, "_CHECKED", set())
    monkeypatch.setattr(_metal, "_FAILED", {})
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    bits, D, dtype = 3, 64, mx.float16
    before = simulator.launches.copy()
    codebook_preflight(dtype=dtype, head_dim=D, widths=PLANES[bits])
    assert simulator.launches == before and not _metal._CHECKED
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    codebook_preflight(dtype=dtype, head_dim=D, widths=PLANES[bits])
    ready = set(_metal._CHECKED)
    assert {name for name, _ in ready} == {"codebook_scores", "codebook_weighted"}
    codec = CodebookCodec(bits)
    state = codec.encode(mx.random.normal((1, 2, 37, D), key=mx.random.key(0)).astype(dtype))
    q = mx.random.normal((1, 2, 3, D), key=mx.random.key(1)).astype(dtype)
    got = {}
    for mode in ("auto", "reference"):
        monkeypatch.setenv("MLXKV_KERNELS", mode)
        scores = codec.scores(q, state)
        p = mx.softmax(scores.astype(mx.float32), axis=-1).astype(dtype)
        got[mode] = (scores, codec.weighted(p, state))
        mx.eval(got[mode])
    ran = simulator.launches - before
    assert ran["codebook_scores"] == 2 and ran["codebook_weighted"] == 2  # preflight, attention
    assert _metal._CHECKED == ready and not _metal._FAILED
    for mine, ref in zip(got["auto"], got["reference"]):
        close(mine, ref, dtype)


@pytest.mark.parametrize("rep", [12, 16])
def test_sdpa_gqa_ratios_above_one_threadgroups_share(metal_sim, rep):
    """More query heads per kv head than a threadgroup serves (8): the group is split
    (12 -> 2 groups of 6, 16 -> 2 of 8), in both passes, with the attention mass (summed
    over the groups) and a new token (stored by the kv head's first group)."""
    case = attention_case(rep=rep, n=300, nf=3, H=1)
    assert sdpa_quantized.group_size(rep, 1) == (6 if rep == 12 else 8)
    for passes in (1, 2):
        got, want = run_both(case, passes, mass_rows=(0, 1), new=new_token(case, [[150]]))
        close(got.out, want.out, mx.float32)
        close(got.mass, want.mass, mx.float32)
        assert np.array_equal(np.array(got.new_keys[0]), np.array(want.new_keys[0]))


# ----- a cache's decode steps on the fused path -------------------------------------------
def _decode_caches():
    from mlxkv.cache.quantized import QuantizedCache
    from mlxkv.cache.scored import ScoredCache
    from mlxkv.cache.window import WindowCache
    from mlxkv.policies import H2OPolicy, KnormPolicy, SnapKVPolicy

    q4 = dict(key_bits=4, value_bits=4, group_size=32)
    return {
        "growing": lambda: QuantizedCache(**q4),
        "window, sinks": lambda: WindowCache(window=40, sinks=4, **q4),
        "snapkv": lambda: ScoredCache(policy=SnapKVPolicy(), recent=4, window=40, sinks=4, **q4),
        "h2o, no sinks": lambda: ScoredCache(policy=H2OPolicy(), recent=2, window=36, sinks=0, **q4),
        "knorm": lambda: ScoredCache(policy=KnormPolicy(), recent=4, window=40, sinks=4, **q4),
        "residual": lambda: QuantizedCache(residual=16, **q4),
    }


@pytest.mark.parametrize("kind", list(_decode_caches()))
def test_cache_decode_on_the_fused_path_stores_and_attends_as_the_reference(kernels_built_by, 
        simulator, monkeypatch, kind):
    """Decode steps, one token at a time past a ring's capacity (each evicting), on the
    simulated Metal path — the new token quantized inside the attention launch, the slot
    it takes chosen by the eviction strategy first — give the outputs, the stored tokens
    and the scores of the reference path, and launch nothing but the attention."""
    B, H, rep, D, T, steps = 1, 2, 3, 64, 52, 32
    mx.random.seed(3)
    k, v = mx.random.normal((B, H, T + steps, D)), mx.random.normal((B, H, T + steps, D))
    q = mx.random.normal((B, H * rep, T + steps, D))
    results = {}
    for mode in ("reference", "metal"):
        monkeypatch.setenv("MLXKV_KERNELS", mode)
        if mode == "metal" and not mx.metal.is_available():
            kernels_built_by(simulator.metal_kernel)
        cache = _decode_caches()[kind]()
        cache.update_and_fetch(k[:, :, :T], v[:, :, :T])
        cache.attend(q[:, :, :T], scale=0.125)
        before = simulator.launches.copy()
        outs = []
        for t in range(T, T + steps):
            cache.update_and_fetch(k[:, :, t:t + 1], v[:, :, t:t + 1])
            outs.append(cache.attend(q[:, :, t:t + 1], scale=0.125))
            mx.eval(outs[-1], cache.state)
        results[mode] = (mx.concatenate(outs, axis=2), cache.dequantized(),
                         getattr(cache.eviction, "score", None), simulator.launches - before)
    (out, (dk, dv), score, _), (r_out, (rk, rv), r_score, _) = results["metal"], results["reference"]
    close(out, r_out, mx.float32)
    assert dk.shape == rk.shape  # the same tokens held ...
    close(dk, rk, mx.float32)   # ... with the same codes
    close(dv, rv, mx.float32)
    if r_score is not None:
        close(score, r_score, mx.float32)
    if mx.metal.is_available():
        return
    ran = results["metal"][3]
    if kind == "residual":  # the quantizer runs once per group of 32 flushed, not per step
        assert 0 < ran["quantize_rows"] < steps
    else:
        assert ran["quantize_rows"] == 0
    assert ran["sdpa_quantized"] + ran["sdpa_quantized_pass1"] == steps
