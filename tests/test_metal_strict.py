"""The strict front end: kernels Apple's Metal compiler rejects are rejected here too,
each with the reason and the ``.metal`` file and line; the same kernels written the
Metal way still run. (On a Mac the real compiler is used, so these run on Linux only
through the simulator fixture, which is every CI run.)"""

import mlx.core as mx
import numpy as np
import pytest

from mlxkv.metalsim import Simulator, SimulatorError

HELPER = '#line 1 "helpers.h"\ninline float first(const device float* p) { return p[0]; }\n'
GENERIC = '#line 1 "helpers.h"\ntemplate <typename P>\ninline float first(P p) { return p[0]; }\n'

# name: (header, body, input elements, threadgroup size, words expected in the error)
BAD = {
    "constant input to a device helper": (
        HELPER, "uint i = thread_position_in_grid.x;\nout[i] = first(x);", 4, 32,
        ["t.metal:2", "no matching function", "constant"]),
    "variable-length array": (
        "", "int n = int(x[0]);\nfloat tmp[n];\nout[0] = tmp[0];", 16, 32,
        ["t.metal:2", "variable length array"]),
    "std:: call": (
        "", "uint i = thread_position_in_grid.x;\nout[i] = std::max(x[i], 0.0f);", 16, 32,
        ["t.metal:2", "std"]),
    "double arithmetic": (
        "", "uint i = thread_position_in_grid.x;\ndouble d = x[i];\nout[i] = float(d * 2);",
        16, 32, ["t.metal:2", "double_is_not_supported"]),
    "40 KB of threadgroup memory": (
        "", "threadgroup float big[10240];\nuint i = thread_position_in_grid.x;\n"
            "big[i] = x[i];\nthreadgroup_barrier(mem_flags::mem_threadgroup);\nout[i] = big[i];",
        16, 32, ["t.metal:1", "threadgroup memory"]),
    "static local": (
        "", "uint i = thread_position_in_grid.x;\nstatic float s = 1.0f;\nout[i] = x[i] * s;",
        16, 32, ["t.metal:2", "static local"]),
    "recursion": (
        '#line 1 "helpers.h"\ninline int fact(int n) {\n  return n < 2 ? 1 : n * fact(n - 1);\n}\n',
        "uint i = thread_position_in_grid.x;\nout[i] = x[i] * float(fact(3));", 16, 32,
        ["helpers.h:1", "fact calls itself"]),
    "threadgroup array in a helper": (
        '#line 1 "helpers.h"\ninline float stash(float v) {\n  threadgroup float t[32];\n'
        '  t[0] = v;\n  return t[0];\n}\n',
        "uint i = thread_position_in_grid.x;\nout[i] = stash(x[i]);", 16, 32,
        ["helpers.h:2", "kernel scope"]),
    "a name of MLX's prelude redefined": (
        '#line 1 "helpers.h"\ninline size_t ceildiv(size_t a, size_t b) { return (a + b - 1) / b; }\n',
        "uint i = thread_position_in_grid.x;\nout[i] = x[i] + float(ceildiv(3, 2));", 16, 32,
        ["helpers.h:1", "redefinition of 'ceildiv'"]),
    "new": (
        "", "uint i = thread_position_in_grid.x;\nfloat* p = new float[4];\nout[i] = x[i] + p[0];",
        16, 32, ["t.metal:2", "new_is_not_supported"]),
}


def launch(sim, header, body, n, group):
    k = sim.metal_kernel(name="t", input_names=["x"], output_names=["out"], source=body,
                         header=header)
    x = mx.arange(n, dtype=mx.float32)
    (out,) = k(inputs=[x], grid=(n, 1, 1), threadgroup=(group, 1, 1), output_shapes=[(n,)],
               output_dtypes=[mx.float32])
    return np.array(out)


@pytest.mark.parametrize("case", sorted(BAD))
def test_what_apples_compiler_rejects_is_rejected(simulator, case):
    header, body, n, group, words = BAD[case]
    with pytest.raises(SimulatorError) as err:
        launch(simulator, header, body, n, group)
    text = str(err.value)
    assert "Apple's Metal compiler" in text
    for word in words:
        assert word in text, (case, text)


def test_the_permissive_simulator_would_have_run_them(tmp_path):
    """What the strict front end adds: without it, the first case runs (and is wrong on a Mac)."""
    lax = Simulator(strict=False, cache=tmp_path)
    out = launch(lax, HELPER, BAD["constant input to a device helper"][1], 4, 32)
    assert out.tolist() == [0.0] * 4


GOOD = {
    "generic helper takes the constant input": (GENERIC, "uint i = thread_position_in_grid.x;\n"
                                                "out[i] = first(x) + x[i];", 4, 32),
    "32 KB of threadgroup memory at kernel scope": (
        "", "threadgroup float big[8192];\nuint i = thread_position_in_grid.x;\n"
            "big[i] = x[i];\nthreadgroup_barrier(mem_flags::mem_threadgroup);\n"
            "out[i] = big[i] + x[i];", 16, 32),
}


@pytest.mark.parametrize("case", sorted(GOOD))
def test_the_metal_way_passes_and_runs(simulator, case):
    header, body, n, group = GOOD[case]
    out = launch(simulator, header, body, n, group)
    x = np.arange(n, dtype=np.float32)
    assert np.allclose(out, x + (x[0] if "helper" in case else x))


def test_the_thread_limit_is_mlxs_error(simulator):
    with pytest.raises(ValueError, match="maximum allowed threads per threadgroup"):
        launch(simulator, "", "out[0] = x[0];", 2048, 2048)
