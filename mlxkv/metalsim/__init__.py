"""Run ``mx.fast.metal_kernel`` bodies on a CPU: a simulator for machines without Metal.

``Simulator().metal_kernel`` has the signature of ``mx.fast.metal_kernel`` and returns a
callable taking the same keyword arguments, so code written for Metal runs unchanged
when the simulator is put in its place (tests do it with ``monkeypatch``)::

    sim = Simulator(seed=3)
    kernel = sim.metal_kernel(name="axpy", input_names=["a", "x"], output_names=["y"],
                              source="uint i = thread_position_in_grid.x; y[i] = a * x[i];")
    (y,) = kernel(inputs=[mx.array(2.0), x], grid=(n, 1, 1), threadgroup=(256, 1, 1),
                  output_shapes=[x.shape], output_dtypes=[x.dtype])

How it works:
- the kernel source is generated exactly as MLX's ``write_signature`` does (inputs,
  ``_shape``/``_strides``/``_ndim`` when the body names them, outputs, the Metal
  attributes the body names, in MLX's order; ``msl_source`` returns that text);
- first a strict front end (``strict.py``, on by default) rejects what Apple's compiler
  rejects: clang checks the same source with address spaces as types, MSL's C++14
  subset, MLX's prelude names and the 32 KiB threadgroup limit, each error at its
  ``.metal`` file and line;
- it is compiled as C++17 with the system compiler against ``shim.h`` (MSL types,
  math, atomics, simdgroup collectives), cached by a hash of everything that goes in;
- every thread of a threadgroup runs as a cooperative fiber: barriers and simdgroup
  collectives are rendezvous points of the live threads, so they run in lock step;
  threadgroups run one after another, in a seeded order when ``seed`` is set, and so
  do the threads between two sync points;
- outputs start as 0xFF bytes (NaN for floats) unless ``init_value`` is given, and so
  does threadgroup memory, so unwritten outputs and missing barriers show up as NaN;
- lanes of a simdgroup meeting at different collectives, and threads that wait at a
  barrier the others cannot reach, are reported as errors;
- each launch runs in a forked worker process with a time limit, so a crash or a hang
  fails that call with ``SimulatorError``, not the whole process.

What it cannot emulate (kernels here stay inside these lines):
- divergent collectives under a partial SIMT mask (legal on a GPU) are errors here;
- spin-waits across threadgroups hang (threadgroups run one after another);
- races show up only at sync points and in the seeded orders tried;
- floating point is not bit-exact with the GPU (fast math, FMA, reduction order);
- swizzles (``.xy``), ``simdgroup_matrix``, textures, function constants, overloads by
  address space, packed vector types;
- inputs are always passed row-contiguous (``ensure_row_contiguous=False`` passes the
  contiguous strides);
- the strict front end is a model of Apple's compiler, not that compiler: Metal's own
  warnings, its register limits (a pipeline may allow fewer than 1024 threads) and
  anything outside ``strict.h``'s declarations are only seen on a Mac (the README says
  how to check there);
- it is eager: each call evaluates its inputs and returns computed arrays.

This module is a little over 300 lines on purpose: it is one launch's life (build, bind
the buffers, run in a forked worker, read the results and the profile), which reads best
in one place; what MLX generates is ``source.py``, the strict front end ``strict.py``.
"""

from __future__ import annotations

import collections
import ctypes
import faulthandler
import hashlib
import mmap
import os
import signal
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..paths import cache_dir
from . import strict as _strict
from .source import (ATTRIBUTES, MAX_CONSTANT_ARRAY_SIZE, MAX_THREADS_PER_THREADGROUP,  # noqa: F401
                     SIMD_WIDTH, TYPE_NAMES, Spec, kernel_name, type_name)

_NUMPY = {
    mx.bool_: np.bool_, mx.uint8: np.uint8, mx.uint16: np.uint16, mx.uint32: np.uint32,
    mx.uint64: np.uint64, mx.int8: np.int8, mx.int16: np.int16, mx.int32: np.int32,
    mx.int64: np.int64, mx.float16: np.float16, mx.bfloat16: np.uint16,
    mx.float32: np.float32,
}

CXXFLAGS = ["-std=c++17", "-O2", "-fPIC", "-shared", "-fvisibility=hidden",
            "-fsingle-precision-constant", "-fwrapv", "-fno-strict-aliasing",
            "-Wno-attributes", "-Wno-unused-variable", "-Wno-unused-parameter"]

# the compiler calls __tsan_readN/__tsan_writeN at every access; shim.h counts them
PROFILE_FLAGS = ["-fsanitize=thread", "-DMLXKV_SIM_PROFILE"]


@dataclass(frozen=True)
class Traffic:
    """Device memory one profiled launch touched, in bytes: ``read`` per input (each byte
    once per threadgroup), ``written`` per output."""
    name: str
    read: dict
    written: dict
    threadgroups: int


class SimulatorError(RuntimeError):
    """A simulated kernel failed: compile error, divergent collective, deadlock, crash,
    or time limit."""


def _compiler() -> tuple[str, str]:
    cxx = os.environ.get("CXX", "g++")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise SimulatorError(f"the Metal simulator needs a C++ compiler ({cxx}): {e}") from None
    return cxx, version.stdout.splitlines()[0]


def _strict_clang() -> tuple[str, str]:
    try:
        return _strict.clang()
    except _strict.StrictError as e:
        raise SimulatorError(str(e)) from None


def _shim_dir() -> Path:
    return Path(str(resources.files(__package__)))


def _to_numpy(x: mx.array) -> np.ndarray:
    if x.dtype == mx.bfloat16:
        x = x.view(mx.uint16)
    return np.ascontiguousarray(np.array(x, copy=False))


def _from_numpy(a: np.ndarray, dtype) -> mx.array:
    out = mx.array(a)
    return out.view(mx.bfloat16) if dtype == mx.bfloat16 else out


class Simulator:
    """Options of simulated launches; ``metal_kernel`` is the drop-in.

    seed: 0 runs threadgroups and threads in index order; other values shuffle both
    (seeded), to shake out order dependence. timeout: seconds per launch. strict: check
    each instantiation with the strict front end first (``strict.py``; needs clang).
    profile: count the device bytes each launch reads and writes (``traffic``; builds
    instrumented, several times slower).
    """

    def __init__(self, *, seed: int = 0, timeout: float = 120.0, cache: Path | None = None,
                 strict: bool = True, profile: bool = False):
        self.seed = seed
        self.strict = strict
        self.profile = profile
        self.traffic: list[Traffic] = []  # one per launch, when profiling
        self.timeout = timeout
        self.cache = Path(cache) if cache else cache_dir() / "metalsim"
        self.launches = collections.Counter()  # kernel name -> simulated launches

    def metal_kernel(self, name, input_names, output_names, source, header="",
                     ensure_row_contiguous=True, atomic_outputs=False, compile_options=None):
        spec = Spec(name, input_names, output_names, source, header, ensure_row_contiguous,
                     atomic_outputs)

        def kernel(*, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
                   init_value=None, verbose=False, stream=None):
            return self._launch(spec, inputs, output_shapes, output_dtypes, grid, threadgroup,
                                template or [], init_value, verbose)

        kernel.spec = spec
        return kernel

    # ----- compile ---------------------------------------------------------------
    def build(self, spec: Spec, inputs, output_dtypes, template) -> Path:
        """Compile (or reuse) the shared library for this instantiation."""
        cxx, version = _compiler()
        source = spec.cxx_source(inputs, output_dtypes, template)
        flags = CXXFLAGS + (PROFILE_FLAGS if self.profile else [])
        headers = [(_shim_dir() / h).read_text() for h in ("shim.h", "msl_math.h")]
        parts = [source, *headers, version, " ".join(flags)]
        if self.strict:  # a library in the cache passed the strict front end when built
            parts += [(_shim_dir() / "strict.h").read_text(), _strict_clang()[1],
                      " ".join(_strict.CLANG_FLAGS), str(_strict.MAX_THREADGROUP_BYTES)]
        key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]
        lib = self.cache / f"{spec.name}-{key}.so"
        if lib.exists():
            return lib
        if self.strict:
            try:
                _strict.check(spec, inputs, output_dtypes, template, include=_shim_dir())
            except _strict.StrictError as e:
                raise SimulatorError(f"kernel {spec.name!r} would not compile with Apple's "
                                     f"Metal compiler:\n{e}") from None
        self.cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.cache) as tmp:
            src = Path(tmp) / f"{spec.name}.cpp"
            src.write_text(source)
            out = Path(tmp) / "kernel.so"
            if self.profile:  # instrumented object, linked without the sanitizer's runtime
                obj = Path(tmp) / "kernel.o"
                proc = subprocess.run([cxx, *flags, "-c", "-I", str(_shim_dir()), str(src),
                                       "-o", str(obj)], capture_output=True, text=True)
                if not proc.returncode:
                    proc = subprocess.run([cxx, "-shared", str(obj), "-o", str(out)],
                                          capture_output=True, text=True)
            else:
                proc = subprocess.run([cxx, *flags, "-I", str(_shim_dir()), str(src), "-o", str(out)],
                                      capture_output=True, text=True)
            if proc.returncode:
                errors = "\n".join(line for line in proc.stderr.splitlines()
                                   if "error" in line or line.startswith(" "))[:4000]
                raise SimulatorError(f"kernel {spec.name!r} does not compile:\n{errors}")
            os.replace(out, lib)
        return lib

    # ----- launch ----------------------------------------------------------------
    def _launch(self, spec, inputs, output_shapes, output_dtypes, grid, threadgroup, template,
                init_value, verbose):
        inputs = [x if isinstance(x, mx.array) else mx.array(x) for x in inputs]
        for what, got in (("inputs", inputs), ("output_shapes", output_shapes),
                          ("output_dtypes", output_dtypes)):
            want = len(spec.input_names if what == "inputs" else spec.output_names)
            if len(got) != want:
                raise ValueError(f"[metal_kernel] Expected `{what}` to have size {want} "
                                 f"but got size {len(got)}.")
        grid = tuple(int(g) for g in grid)
        group = tuple(min(int(t), g) for t, g in zip(threadgroup, grid))
        if len(grid) != 3 or len(group) != 3 or min(grid) < 1 or min(group) < 1:
            raise ValueError(f"[metal_kernel] grid {grid} and threadgroup {threadgroup} "
                             "need three positive sizes")
        if int(np.prod(threadgroup)) > MAX_THREADS_PER_THREADGROUP:
            raise ValueError(f"Thread group size ({int(np.prod(threadgroup))}) is greater than "
                             f"the maximum allowed threads per threadgroup "
                             f"({MAX_THREADS_PER_THREADGROUP}).")
        if verbose:
            print(f"Generated source code for `{spec.name}`:\n```\n"
                  f"{spec.msl_source(inputs, output_dtypes, template)}\n```")
        lib = self.build(spec, inputs, output_dtypes, template)

        # Buffers in MLX's binding order: each input (+ shape, strides, ndim), outputs.
        keep, pointers, ranges = [], [], []
        for x, (shape, strides, ndim) in zip(inputs, spec.shape_infos):
            a = _to_numpy(x)
            keep.append(a)
            pointers.append(a.ctypes.data)
            ranges.append((a.ctypes.data, a.ctypes.data + a.nbytes))
            if x.ndim == 0:
                continue
            extras = []
            if shape:
                extras.append(np.array(x.shape, np.int32))
            if strides:
                extras.append(np.array([s // a.itemsize for s in a.strides], np.int64))
            if ndim:
                extras.append(np.array([x.ndim], np.int32))
            for e in extras:
                keep.append(e)
                pointers.append(e.ctypes.data)
        outputs = []
        for shape, dt in zip(output_shapes, output_dtypes):
            npdt = np.dtype(_NUMPY[dt])
            size = max(1, int(np.prod(shape)) * npdt.itemsize)
            buf = mmap.mmap(-1, size)  # shared with the worker
            view = np.frombuffer(buf, dtype=npdt, count=int(np.prod(shape))).reshape(shape)
            if init_value is None:
                buf.write(b"\xff" * size)
            else:
                fill = np.asarray(init_value, dtype=np.float32)
                view[...] = (_to_numpy(mx.array(fill).astype(dt)) if dt == mx.bfloat16
                             else fill.astype(npdt))
            outputs.append((buf, view, dt))
            pointers.append(ctypes.addressof(ctypes.c_char.from_buffer(buf)))
            ranges.append((pointers[-1], pointers[-1] + int(np.prod(shape)) * npdt.itemsize))
        ptr_array = (ctypes.c_void_p * len(pointers))(*pointers)
        grid_arr = (ctypes.c_uint32 * 3)(*grid)
        group_arr = (ctypes.c_uint32 * 3)(*group)
        counts = mmap.mmap(-1, 16 * len(ranges)) if self.profile else None  # shared with the worker
        self._run(spec.name, lib, ptr_array, grid_arr, group_arr, ranges, counts)
        self.launches[spec.name] += 1
        if counts is not None:
            c = np.frombuffer(counts, np.uint64).reshape(-1, 2).tolist()
            n_in = len(inputs)
            groups = int(np.prod([-(-g // t) for g, t in zip(grid, group)]))
            self.traffic.append(Traffic(
                spec.name, read=dict(zip(spec.input_names, (r for r, _ in c[:n_in]))),
                written=dict(zip(spec.output_names, (w for _, w in c[n_in:]))),
                threadgroups=groups))
        return [_from_numpy(view.copy(), dt) for _, view, dt in outputs]

    def _run(self, name, lib, ptrs, grid, group, ranges=(), counts=None):
        report = mmap.mmap(-1, 4096)
        _quiesce()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork of a threaded process
            pid = os.fork()
        if pid == 0:  # the worker: run the kernel, report, exit without cleanup
            code = 3
            try:
                faulthandler.disable()  # a crash is reported by the parent, not dumped here
                signal.signal(signal.SIGALRM, signal.SIG_DFL)
                signal.setitimer(signal.ITIMER_REAL, self.timeout)
                so = ctypes.CDLL(str(lib))
                if counts is not None:
                    flat = (ctypes.c_uint64 * (2 * len(ranges)))(*[v for r in ranges for v in r])
                    target = ctypes.addressof(ctypes.c_char.from_buffer(counts))
                    so.mlxkv_sim_profile(flat, len(ranges), ctypes.c_void_p(target))
                err = ctypes.create_string_buffer(2048)
                so.mlxkv_sim_run.restype = ctypes.c_int
                code = so.mlxkv_sim_run(ptrs, grid, group, ctypes.c_uint64(self.seed), err, 2048)
                report.write(err.value[:4000])
            except BaseException as e:  # noqa: BLE001 - reported to the parent, then exit
                report.write(repr(e).encode()[:4000])
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        message = report[:].split(b"\0", 1)[0].decode(errors="replace")
        report.close()
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            if sig == signal.SIGALRM:
                raise SimulatorError(f"kernel {name!r} did not finish within {self.timeout:g} s "
                                     "(a hang, or a spin-wait across threadgroups)")
            raise SimulatorError(f"kernel {name!r} crashed ({signal.Signals(sig).name}: an "
                                 "out-of-bounds access or a fiber stack overflow)")
        code = os.WEXITSTATUS(status)
        if code:
            raise SimulatorError(f"kernel {name!r}: {message or f'worker exit {code}'}")


def _quiesce() -> None:
    """Wait until nothing runs in MLX's worker threads, before a fork: OpenBLAS's fork
    handler waits for its threads, and with a matmul still running in one it waited
    forever (seen: the step mlx-lm's ``generate_step`` queues ahead with ``async_eval``,
    still running on its generation stream after a generation that stopped early)."""
    mx.synchronize()
    generate = sys.modules.get("mlx_lm.generate")
    if generate is not None:
        mx.synchronize(generate.generation_stream)


def metal_kernel(*args, **kwargs):
    """``mx.fast.metal_kernel`` on the simulator with default options."""
    return Simulator().metal_kernel(*args, **kwargs)
