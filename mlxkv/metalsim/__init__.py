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
- the shim accepts a superset of MSL: a kernel that passes here can still fail Apple's
  compiler (the README says how to check on a Mac);
- it is eager: each call evaluates its inputs and returns computed arrays.
"""

from __future__ import annotations

import collections
import ctypes
import faulthandler
import hashlib
import mmap
import os
import re
import signal
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..paths import cache_dir

SIMD_WIDTH = 32
MAX_THREADS_PER_THREADGROUP = 1024
MAX_CONSTANT_ARRAY_SIZE = 8  # MLX passes smaller inputs in the constant address space

TYPE_NAMES = {
    mx.bool_: "bool", mx.uint8: "uint8_t", mx.uint16: "uint16_t", mx.uint32: "uint32_t",
    mx.uint64: "uint64_t", mx.int8: "int8_t", mx.int16: "int16_t", mx.int32: "int32_t",
    mx.int64: "int64_t", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t",
    mx.float32: "float",
}
_NUMPY = {
    mx.bool_: np.bool_, mx.uint8: np.uint8, mx.uint16: np.uint16, mx.uint32: np.uint32,
    mx.uint64: np.uint64, mx.int8: np.int8, mx.int16: np.int16, mx.int32: np.int32,
    mx.int64: np.int64, mx.float16: np.float16, mx.bfloat16: np.uint16,
    mx.float32: np.float32,
}

# Metal attributes in MLX's order, with their types and how the simulator computes them.
ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint", "t.dispatch_quadgroups_per_threadgroup"),
    ("dispatch_simdgroups_per_threadgroup", "uint", "t.dispatch_simdgroups_per_threadgroup"),
    ("dispatch_threads_per_threadgroup", "uint3", "t.dispatch_threads_per_threadgroup"),
    ("grid_origin", "uint3", "uint3(0u, 0u, 0u)"),
    ("grid_size", "uint3", "t.threads_per_grid"),
    ("quadgroup_index_in_threadgroup", "uint", "t.tid / 4"),
    ("quadgroups_per_threadgroup", "uint", "t.quadgroups_per_threadgroup"),
    ("simdgroup_index_in_threadgroup", "uint", f"t.tid / {SIMD_WIDTH}"),
    ("simdgroups_per_threadgroup", "uint", "t.simdgroups_per_threadgroup"),
    ("thread_execution_width", "uint", f"{SIMD_WIDTH}u"),
    ("thread_index_in_quadgroup", "uint", "t.tid % 4"),
    ("thread_index_in_simdgroup", "uint", f"t.tid % {SIMD_WIDTH}"),
    ("thread_index_in_threadgroup", "uint", "t.tid"),
    ("thread_position_in_grid", "uint3", "t.thread_position_in_grid"),
    ("thread_position_in_threadgroup", "uint3", "t.thread_position_in_threadgroup"),
    ("threadgroup_position_in_grid", "uint3", "t.threadgroup_position_in_grid"),
    ("threadgroups_per_grid", "uint3", "t.threadgroups_per_grid"),
    ("threads_per_grid", "uint3", "t.threads_per_grid"),
    ("threads_per_simdgroup", "uint", f"{SIMD_WIDTH}u"),
    ("threads_per_threadgroup", "uint3", "t.threads_per_threadgroup"),
]

CXXFLAGS = ["-std=c++17", "-O2", "-fPIC", "-shared", "-fvisibility=hidden",
            "-fsingle-precision-constant", "-fwrapv", "-fno-strict-aliasing",
            "-Wno-attributes", "-Wno-unused-variable", "-Wno-unused-parameter"]

_SYNC = re.compile(r"\b(simd_\w+|threadgroup_barrier|simdgroup_barrier|quad_\w+)\s*\(")


class SimulatorError(RuntimeError):
    """A simulated kernel failed: compile error, divergent collective, deadlock, crash,
    or time limit."""


@dataclass(frozen=True)
class _Arg:
    """One parameter of the generated function, and how the launcher passes it."""
    decl: str    # the MSL parameter text
    call: str    # the C++ expression passing it


def type_name(dtype) -> str:
    try:
        return TYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"[metal_kernel] unsupported dtype {dtype}") from None


def _template_text(template) -> str:
    parts = []
    for _, value in template:
        if isinstance(value, bool):
            parts.append("1" if value else "0")
        elif isinstance(value, int):
            parts.append(str(value))
        else:
            parts.append(type_name(value))
    return "<" + ", ".join(parts) + ">"


def kernel_name(name: str, template, inputs, output_dtypes) -> str:
    """The name MLX gives the generated kernel (template values, input and output dtypes)."""
    out = "custom_kernel_" + name
    if template:
        out += "_" + re.sub(r"<|>|(, )", "_", _template_text(template))[:-1]
    for x in inputs:
        out += "_" + type_name(x.dtype)
        if x.ndim == 0:
            out += "s"
        elif x.size < MAX_CONSTANT_ARRAY_SIZE:
            out += "c"
    for dt in output_dtypes:
        out += "_" + type_name(dt)
    return out


class _Spec:
    """A kernel as ``mx.fast.metal_kernel`` was given it."""

    def __init__(self, name, input_names, output_names, source, header,
                 ensure_row_contiguous, atomic_outputs):
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        self.name, self.source, self.header = name, source, header
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.ensure_row_contiguous = ensure_row_contiguous
        self.atomic_outputs = atomic_outputs
        self.shape_infos = [tuple(n + suffix in source for suffix in ("_shape", "_strides", "_ndim"))
                            for n in self.input_names]
        self.attributes = [a for a in ATTRIBUTES if a[0] in source]

    def args(self, inputs, output_dtypes) -> list[_Arg]:
        args, index = [], 0
        for name, x, (shape, strides, ndim) in zip(self.input_names, inputs, self.shape_infos):
            tname = type_name(x.dtype)
            space = "constant" if x.size < MAX_CONSTANT_ARRAY_SIZE else "device"
            if x.ndim == 0:
                args.append(_Arg(f"  const {space} {tname}& {name} [[buffer({index})]]",
                                 f"*static_cast<const {tname}*>(a[{index}])"))
            else:
                args.append(_Arg(f"  const {space} {tname}* {name} [[buffer({index})]]",
                                 f"static_cast<const {tname}*>(a[{index}])"))
            index += 1
            if x.ndim == 0:
                continue
            for wanted, decl, ctype, deref in (
                    (shape, "const constant int* {}_shape", "int", ""),
                    (strides, "const constant int64_t* {}_strides", "int64_t", ""),
                    (ndim, "const constant int& {}_ndim", "int", "*")):
                if wanted:
                    args.append(_Arg(f"  {decl.format(name)} [[buffer({index})]]",
                                     f"{deref}static_cast<const {ctype}*>(a[{index}])"))
                    index += 1
        for name, dt in zip(self.output_names, output_dtypes):
            tname = type_name(dt)
            ptype = f"atomic<{tname}>" if self.atomic_outputs else tname
            args.append(_Arg(f"  device {ptype}* {name} [[buffer({index})]]",
                             f"static_cast<{ptype}*>(a[{index}])"))
            index += 1
        for attr, atype, expr in self.attributes:
            args.append(_Arg(f"  {atype} {attr} [[{attr}]]", expr))
        return args

    def signature(self, func_name, template, args) -> str:
        text = ""
        if template:
            kinds = ["bool" if isinstance(v, bool) else "int" if isinstance(v, int) else "typename"
                     for _, v in template]
            text += "template <" + ", ".join(f"{k} {n}" for k, (n, _) in zip(kinds, template)) + ">\n"
        return text + f"[[kernel]] void {func_name}(\n" + ",\n".join(a.decl for a in args) + ") {\n"

    def msl_source(self, inputs, output_dtypes, template=()) -> str:
        """The Metal source MLX would compile for these inputs (as ``verbose=True`` prints)."""
        func = kernel_name(self.name, template, inputs, output_dtypes)
        text = self.header + self.signature(func, template, self.args(inputs, output_dtypes))
        text += self.source + "\n}\n"
        if template:
            inst = func + _template_text(template)
            text += (f'\ntemplate [[host_name("{func}")]] [[kernel]] decltype({inst}) {inst};\n')
        return text

    def cxx_source(self, inputs, output_dtypes, template=()) -> str:
        """The translation unit the simulator compiles: shim + the same text + a launcher."""
        func = re.sub(r"\W", "_", kernel_name(self.name, template, inputs, output_dtypes))
        args = self.args(inputs, output_dtypes)
        fibers = bool(_SYNC.search(self.header + self.source))
        inst = func + (_template_text(template) if template else "")
        call = ", ".join(a.call for a in args)
        return "\n".join([
            '#include "shim.h"',
            f'#line 1 "{self.name}:header"',
            _rewrite(self.header),
            f'#line 1 "{self.name}:signature"',
            self.signature(func, template, args),
            f'#line 1 "{self.name}.metal"',
            _rewrite(self.source),
            "}",
            '#line 1 "metalsim:launcher"',
            'extern "C" __attribute__((visibility("default"))) int mlxkv_sim_run(',
            "    void** a, const uint32_t* grid, const uint32_t* group, uint64_t seed,",
            "    char* err, int errlen) {",
            "  std::function<void(const ::mlxkv_sim::Ids&)> body = "
            f"[&](const ::mlxkv_sim::Ids& t) {{ {inst}({call}); }};",
            f"  return ::mlxkv_sim::launch(grid, group, seed, {str(fibers).lower()}, err, errlen, body);",
            "}",
        ])


_TG_DECL = re.compile(
    r"^(?P<indent>[ \t]*)threadgroup\s+(?P<type>[A-Za-z_][\w:<>, ]*?)\s+(?P<name>[A-Za-z_]\w*)"
    r"\s*(?P<dims>(?:\[[^\]]+\])*)\s*;", re.MULTILINE)
_HALF_LITERAL = re.compile(r"(?<![\w.])(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?[hH]\b")
_METAL_INCLUDE = re.compile(r"^\s*#\s*include\s*<metal_\w+>.*$", re.MULTILINE)


def _rewrite(text: str) -> str:
    """MSL -> C++ for the shim: threadgroup declarations become per-threadgroup arena
    slots (poisoned, shared by the group), ``1.0h`` literals become ``half``, and
    ``#include <metal_*>`` lines go (the line count is kept for ``#line``)."""
    counter = iter(range(1, 1 << 30))
    text = _METAL_INCLUDE.sub("", text)
    text = _TG_DECL.sub(lambda m: (f"{m['indent']}auto& {m['name']} = ::mlxkv_sim::tg_alloc<"
                                   f"{m['type']}{m['dims']}>({next(counter)});"), text)
    return _HALF_LITERAL.sub(lambda m: f"((half)({m[1]}{m[2] or ''}))", text)


def _compiler() -> tuple[str, str]:
    cxx = os.environ.get("CXX", "g++")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise SimulatorError(f"the Metal simulator needs a C++ compiler ({cxx}): {e}") from None
    return cxx, version.stdout.splitlines()[0]


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
    (seeded), to shake out order dependence. timeout: seconds per launch.
    """

    def __init__(self, *, seed: int = 0, timeout: float = 120.0, cache: Path | None = None):
        self.seed = seed
        self.timeout = timeout
        self.cache = Path(cache) if cache else cache_dir() / "metalsim"
        self.launches = collections.Counter()  # kernel name -> simulated launches

    def metal_kernel(self, name, input_names, output_names, source, header="",
                     ensure_row_contiguous=True, atomic_outputs=False, compile_options=None):
        spec = _Spec(name, input_names, output_names, source, header, ensure_row_contiguous,
                     atomic_outputs)

        def kernel(*, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
                   init_value=None, verbose=False, stream=None):
            return self._launch(spec, inputs, output_shapes, output_dtypes, grid, threadgroup,
                                template or [], init_value, verbose)

        kernel.spec = spec
        return kernel

    # ----- compile ---------------------------------------------------------------
    def build(self, spec: _Spec, inputs, output_dtypes, template) -> Path:
        """Compile (or reuse) the shared library for this instantiation."""
        cxx, version = _compiler()
        source = spec.cxx_source(inputs, output_dtypes, template)
        shim = (_shim_dir() / "shim.h").read_bytes()
        key = hashlib.sha256("\0".join([source, shim.decode(), version, " ".join(CXXFLAGS)])
                             .encode()).hexdigest()[:24]
        lib = self.cache / f"{spec.name}-{key}.so"
        if lib.exists():
            return lib
        self.cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.cache) as tmp:
            src = Path(tmp) / f"{spec.name}.cpp"
            src.write_text(source)
            out = Path(tmp) / "kernel.so"
            proc = subprocess.run([cxx, *CXXFLAGS, "-I", str(_shim_dir()), str(src), "-o", str(out)],
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
        keep, pointers = [], []
        for x, (shape, strides, ndim) in zip(inputs, spec.shape_infos):
            a = _to_numpy(x)
            keep.append(a)
            pointers.append(a.ctypes.data)
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
        ptr_array = (ctypes.c_void_p * len(pointers))(*pointers)
        grid_arr = (ctypes.c_uint32 * 3)(*grid)
        group_arr = (ctypes.c_uint32 * 3)(*group)
        self._run(spec.name, lib, ptr_array, grid_arr, group_arr)
        self.launches[spec.name] += 1
        return [_from_numpy(view.copy(), dt) for _, view, dt in outputs]

    def _run(self, name, lib, ptrs, grid, group):
        report = mmap.mmap(-1, 4096)
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


def metal_kernel(*args, **kwargs):
    """``mx.fast.metal_kernel`` on the simulator with default options."""
    return Simulator().metal_kernel(*args, **kwargs)
