"""The Metal simulator's own tests: MLX's signature generation, lock-step collectives,
and the bugs it is there to catch (missing barriers, unwritten outputs, divergent
collectives, deadlocks, crashes, hangs)."""

import mlx.core as mx
import numpy as np
import pytest

from mlxkv.metalsim import Simulator, SimulatorError


@pytest.fixture
def sim(simulator):
    return simulator


def run(sim, source, inputs, out_shape, *, names=("x",), dtype=mx.float32, grid, group,
        template=None, init_value=None, atomic=False, header=""):
    k = sim.metal_kernel(name="t", input_names=list(names), output_names=["out"], source=source,
                         header=header, atomic_outputs=atomic)
    (out,) = k(inputs=inputs, grid=grid, threadgroup=group, output_shapes=[out_shape],
               output_dtypes=[dtype], template=template, init_value=init_value)
    return np.array(out.astype(mx.float32) if out.dtype == mx.bfloat16 else out)


def test_signature_is_generated_as_mlx_does(sim):
    source = ("uint i = thread_position_in_grid.x; uint l = thread_index_in_simdgroup;"
              " out[i] = x[i] * a + float(x_shape[0] + w_ndim) + float(l);")
    k = sim.metal_kernel(name="sig", input_names=["x", "a", "w"], output_names=["out"],
                         source=source)
    inputs = [mx.zeros((16,), mx.float16), mx.array(2.0), mx.zeros((3,), mx.int32)]
    text = k.spec.msl_source(inputs, [mx.float32], [("T", mx.bfloat16), ("N", 3), ("B", True)])
    assert text == (
        "template <typename T, int N, bool B>\n"
        "[[kernel]] void custom_kernel_sig__bfloat16_t_3_1_float16_t_floats_int32_tc_float(\n"
        "  const device float16_t* x [[buffer(0)]],\n"
        "  const constant int* x_shape [[buffer(1)]],\n"
        "  const constant float& a [[buffer(2)]],\n"
        "  const constant int32_t* w [[buffer(3)]],\n"
        "  const constant int& w_ndim [[buffer(4)]],\n"
        "  device float* out [[buffer(5)]],\n"
        "  uint thread_index_in_simdgroup [[thread_index_in_simdgroup]],\n"
        "  uint3 thread_position_in_grid [[thread_position_in_grid]]) {\n"
        + source + "\n}\n\n"
        'template [[host_name("custom_kernel_sig__bfloat16_t_3_1_float16_t_floats_int32_tc_float")]]'
        " [[kernel]] decltype(custom_kernel_sig__bfloat16_t_3_1_float16_t_floats_int32_tc_float"
        "<bfloat16_t, 3, 1>) custom_kernel_sig__bfloat16_t_3_1_float16_t_floats_int32_tc_float"
        "<bfloat16_t, 3, 1>;\n")
    (out,) = k(inputs=inputs, grid=(16, 1, 1), threadgroup=(8, 1, 1), output_shapes=[(16,)],
               output_dtypes=[mx.float32])
    assert np.array_equal(np.array(out), 16 + 1 + np.arange(16) % 8)  # lanes of 8-thread groups


def test_grid_attributes_with_partial_threadgroups(sim):
    # 10 x 3 threads in threadgroups of 4 x 2: edge threadgroups are smaller.
    src = """
    uint3 p = thread_position_in_grid;
    uint i = p.y * threads_per_grid.x + p.x;
    out[i * 4 + 0] = float(threadgroup_position_in_grid.x * 10 + threadgroup_position_in_grid.y);
    out[i * 4 + 1] = float(threads_per_threadgroup.x * 10 + threads_per_threadgroup.y);
    out[i * 4 + 2] = float(thread_index_in_threadgroup);
    out[i * 4 + 3] = float(threadgroups_per_grid.x * 10 + threadgroups_per_grid.y);
    """
    out = run(sim, src, [mx.zeros((1,))], (30 * 4,), grid=(10, 3, 1), group=(4, 2, 1)).reshape(3, 10, 4)
    x, y = np.meshgrid(np.arange(10), np.arange(3))
    assert np.array_equal(out[..., 0], x // 4 * 10 + y // 2)
    size_x, size_y = np.where(x >= 8, 2, 4), np.where(y >= 2, 1, 2)
    assert np.array_equal(out[..., 1], size_x * 10 + size_y)
    assert np.array_equal(out[..., 2], (y % 2) * size_x + x % 4)
    assert np.all(out[..., 3] == 32)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_simd_collectives(sim, dtype):
    src = """
    uint i = thread_position_in_grid.x;
    uint lane = thread_index_in_simdgroup;
    T v = x[i];
    out[i * 6 + 0] = simd_sum(v);
    out[i * 6 + 1] = simd_max(v);
    out[i * 6 + 2] = simd_prefix_exclusive_sum(v);
    out[i * 6 + 3] = simd_shuffle_xor(v, ushort(1));
    out[i * 6 + 4] = simd_broadcast(v, ushort(5));
    out[i * 6 + 5] = simd_shuffle_down(v, ushort(2));
    """
    x = mx.arange(64).astype(dtype) % 7
    out = run(sim, src, [x], (64 * 6,), dtype=dtype, grid=(64, 1, 1), group=(64, 1, 1),
              template=[("T", dtype)]).reshape(2, 32, 6).astype(np.float32)
    xs = np.array(x.astype(mx.float32)).reshape(2, 32)
    lanes = np.arange(32)
    for s in range(2):
        assert np.all(out[s, :, 0] == xs[s].sum())
        assert np.all(out[s, :, 1] == xs[s].max())
        assert np.array_equal(out[s, :, 2], np.cumsum(xs[s]) - xs[s])
        assert np.array_equal(out[s, :, 3], xs[s][lanes ^ 1])
        assert np.all(out[s, :, 4] == xs[s][5])
        assert np.array_equal(out[s, :, 5], np.where(lanes + 2 < 32, xs[s][np.minimum(lanes + 2, 31)], xs[s]))


def test_threadgroup_reduction_with_barrier(sim):
    src = """
    threadgroup float part[8];
    uint t = thread_index_in_threadgroup;
    float s = simd_sum(x[thread_position_in_grid.x]);
    if (thread_index_in_simdgroup == 0) part[simdgroup_index_in_threadgroup] = s;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (t == 0) {
      float total = 0;
      for (uint k = 0; k < simdgroups_per_threadgroup; k++) total += part[k];
      out[threadgroup_position_in_grid.x] = total;
    }
    """
    x = mx.random.normal((3 * 256,), key=mx.random.key(0))
    for seed in (0, 5):
        shuffled = Simulator(seed=seed, cache=sim.cache)
        out = run(shuffled, src, [x], (3,), grid=(768, 1, 1), group=(256, 1, 1))
        assert np.allclose(out, np.array(x).reshape(3, 256).sum(1), atol=1e-4)


def test_missing_barrier_is_caught(sim):
    # Each thread writes its slot and reads its neighbour's: without the barrier the
    # neighbour's slot is still poisoned when it is read.
    body = """
    threadgroup float buf[64];
    uint t = thread_index_in_threadgroup;
    buf[t] = x[t];
    {barrier}
    out[t] = buf[(t + 1) % 64];
    """
    x = mx.arange(64).astype(mx.float32)
    good = run(sim, body.format(barrier="threadgroup_barrier(mem_flags::mem_threadgroup);"), [x],
               (64,), grid=(64, 1, 1), group=(64, 1, 1))
    assert np.array_equal(good, (np.arange(64) + 1) % 64)
    bad = run(sim, body.format(barrier=""), [x], (64,), grid=(64, 1, 1), group=(64, 1, 1))
    assert np.isnan(bad).any()


def test_unwritten_outputs_are_nan_unless_init_value(sim):
    src = "uint i = thread_position_in_grid.x; if (i % 2 == 0) out[i] = x[i];"
    x = mx.ones((8,))
    out = run(sim, src, [x], (8,), grid=(8, 1, 1), group=(8, 1, 1))
    assert np.array_equal(np.isnan(out), np.arange(8) % 2 == 1)
    out = run(sim, src, [x], (8,), grid=(8, 1, 1), group=(8, 1, 1), init_value=0)
    assert np.array_equal(out, (np.arange(8) + 1) % 2)


def test_atomic_outputs(sim):
    src = """
    uint i = thread_position_in_grid.x;
    atomic_fetch_add_explicit(&out[x[i]], 1.0f, memory_order_relaxed);
    """
    x = mx.array(np.arange(100) % 7, mx.int32)
    out = run(sim, src, [x], (7,), grid=(100, 1, 1), group=(32, 1, 1), init_value=0, atomic=True)
    assert np.array_equal(out, np.bincount(np.arange(100) % 7))


def test_divergent_collective_is_reported(sim):
    src = """
    uint lane = thread_index_in_simdgroup;
    float v = x[lane];
    out[lane] = lane < 16 ? simd_sum(v) : simd_max(v);
    """
    with pytest.raises(SimulatorError, match="divergent collective: simd_max"):
        run(sim, src, [mx.ones((32,))], (32,), grid=(32, 1, 1), group=(32, 1, 1))


def test_deadlock_is_reported(sim):
    # Half a simdgroup waits at a threadgroup barrier the other half never reaches,
    # while that half waits in a collective the first half never joins.
    src = """
    uint lane = thread_index_in_simdgroup;
    if (lane < 16) {
      threadgroup_barrier(mem_flags::mem_threadgroup);
      out[lane] = 0;
    } else {
      out[lane] = simd_sum(x[lane]);
    }
    """
    with pytest.raises(SimulatorError, match="deadlock"):
        run(sim, src, [mx.ones((32,))], (32,), grid=(32, 1, 1), group=(32, 1, 1))


def test_compile_error_points_at_the_kernel_line(sim):
    src = "uint i = thread_position_in_grid.x;\nout[i] = undefined_name;"
    with pytest.raises(SimulatorError, match=r"t\.metal:2.*undefined_name"):
        run(sim, src, [mx.ones((4,))], (4,), grid=(4, 1, 1), group=(4, 1, 1))


def test_crash_fails_the_call_not_the_process(sim):
    src = "uint i = thread_position_in_grid.x; device float* p = out - (1ul << 40); p[i] = x[i];"
    with pytest.raises(SimulatorError, match="crashed"):
        run(sim, src, [mx.ones((4,))], (4,), grid=(4, 1, 1), group=(4, 1, 1))
    # the process is fine: a good kernel still runs
    out = run(sim, "uint i = thread_position_in_grid.x; out[i] = x[i] * 2;", [mx.ones((4,))], (4,),
              grid=(4, 1, 1), group=(4, 1, 1))
    assert np.array_equal(out, [2, 2, 2, 2])


def test_hang_hits_the_time_limit(sim):
    quick = Simulator(timeout=1.0, cache=sim.cache)
    src = "volatile uint spin = 1; while (spin) { } out[0] = x[0];"
    with pytest.raises(SimulatorError, match="did not finish within 1 s"):
        run(quick, src, [mx.ones((1,))], (1,), grid=(1, 1, 1), group=(1, 1, 1))


def test_bad_launch_arguments(sim):
    k = sim.metal_kernel(name="t", input_names=["x"], output_names=["out"], source="out[0] = x[0];")
    with pytest.raises(ValueError, match="Expected `inputs` to have size 1"):
        k(inputs=[], grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(1,)],
          output_dtypes=[mx.float32])
    with pytest.raises(ValueError, match="maximum allowed threads per threadgroup"):
        k(inputs=[mx.ones((1,))], grid=(2048, 1, 1), threadgroup=(2048, 1, 1),
          output_shapes=[(1,)], output_dtypes=[mx.float32])
    with pytest.raises(ValueError, match="Must specify at least one output"):
        sim.metal_kernel(name="t", input_names=["x"], output_names=[], source="")


def test_profile_counts_device_bytes_once_per_threadgroup(tmp_path):
    """Each input byte counts once per threadgroup that reads it; every written byte counts."""
    sim = Simulator(cache=tmp_path, profile=True)
    k = sim.metal_kernel(name="axpy", input_names=["a", "x"], output_names=["y"],
                         source="uint i = thread_position_in_grid.x;\n"
                                "y[i] = a[0] * x[i] + a[1] + x[i];")
    x = mx.arange(1024, dtype=mx.float32)
    (y,) = k(inputs=[mx.full((16,), 2.0), x], grid=(1024, 1, 1), threadgroup=(256, 1, 1),
             output_shapes=[x.shape], output_dtypes=[x.dtype])
    assert np.array_equal(np.array(y), 3 * np.arange(1024) + 2)
    (t,) = sim.traffic
    # a[0], a[1] (8 bytes) in each of 4 threadgroups; x read twice, counted once; y written once
    assert t.read == {"a": 32, "x": 4096} and t.written == {"y": 4096} and t.threadgroups == 4
