"""What MLX generates for ``mx.fast.metal_kernel``: the kernel's signature and name (as
MLX's ``write_signature`` does), and the text rewrites the simulator compiles.

Both the strict front end (``strict.py``) and the simulator's compile (``__init__.py``)
start from ``Spec``: the same signature, body and template instantiation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import mlx.core as mx

SIMD_WIDTH = 32
MAX_THREADS_PER_THREADGROUP = 1024
MAX_CONSTANT_ARRAY_SIZE = 8  # MLX passes smaller inputs in the constant address space

TYPE_NAMES = {
    mx.bool_: "bool", mx.uint8: "uint8_t", mx.uint16: "uint16_t", mx.uint32: "uint32_t",
    mx.uint64: "uint64_t", mx.int8: "int8_t", mx.int16: "int16_t", mx.int32: "int32_t",
    mx.int64: "int64_t", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t",
    mx.float32: "float",
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

SYNC = re.compile(r"\b(simd_\w+|threadgroup_barrier|simdgroup_barrier|quad_\w+)\s*\(")


@dataclass(frozen=True)
class Arg:
    """One parameter of the generated function, and how the launcher passes it."""
    decl: str    # the MSL parameter text
    call: str    # the C++ expression passing it


def type_name(dtype) -> str:
    try:
        return TYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"[metal_kernel] unsupported dtype {dtype}") from None


def template_text(template) -> str:
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
        out += "_" + re.sub(r"<|>|(, )", "_", template_text(template))[:-1]
    for x in inputs:
        out += "_" + type_name(x.dtype)
        if x.ndim == 0:
            out += "s"
        elif x.size < MAX_CONSTANT_ARRAY_SIZE:
            out += "c"
    for dt in output_dtypes:
        out += "_" + type_name(dt)
    return out


class Spec:
    """A kernel as ``mx.fast.metal_kernel`` was given it."""

    def __init__(self, name, input_names, output_names, source, header,
                 ensure_row_contiguous, atomic_outputs):
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        self.name, self.source, self.header = name, source, header
        # a header that starts with `#line 1 "file"` names its file in errors
        named = re.match(r'#line 1 "([^"]+)"\n', header)
        self.header_name = named[1] if named else None
        self.header_body = header[named.end():] if named else header
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.ensure_row_contiguous = ensure_row_contiguous
        self.atomic_outputs = atomic_outputs
        self.shape_infos = [tuple(n + suffix in source for suffix in ("_shape", "_strides", "_ndim"))
                            for n in self.input_names]
        self.attributes = [a for a in ATTRIBUTES if a[0] in source]

    def args(self, inputs, output_dtypes) -> list[Arg]:
        args, index = [], 0
        for name, x, (shape, strides, ndim) in zip(self.input_names, inputs, self.shape_infos):
            tname = type_name(x.dtype)
            space = "constant" if x.size < MAX_CONSTANT_ARRAY_SIZE else "device"
            if x.ndim == 0:
                args.append(Arg(f"  const {space} {tname}& {name} [[buffer({index})]]",
                                 f"*static_cast<const {tname}*>(a[{index}])"))
            else:
                args.append(Arg(f"  const {space} {tname}* {name} [[buffer({index})]]",
                                 f"static_cast<const {tname}*>(a[{index}])"))
            index += 1
            if x.ndim == 0:
                continue
            for wanted, decl, ctype, deref in (
                    (shape, "const constant int* {}_shape", "int", ""),
                    (strides, "const constant int64_t* {}_strides", "int64_t", ""),
                    (ndim, "const constant int& {}_ndim", "int", "*")):
                if wanted:
                    args.append(Arg(f"  {decl.format(name)} [[buffer({index})]]",
                                     f"{deref}static_cast<const {ctype}*>(a[{index}])"))
                    index += 1
        for name, dt in zip(self.output_names, output_dtypes):
            tname = type_name(dt)
            ptype = f"atomic<{tname}>" if self.atomic_outputs else tname
            args.append(Arg(f"  device {ptype}* {name} [[buffer({index})]]",
                             f"static_cast<{ptype}*>(a[{index}])"))
            index += 1
        for attr, atype, expr in self.attributes:
            args.append(Arg(f"  {atype} {attr} [[{attr}]]", expr))
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
            inst = func + template_text(template)
            text += (f'\ntemplate [[host_name("{func}")]] [[kernel]] decltype({inst}) {inst};\n')
        return text

    def cxx_source(self, inputs, output_dtypes, template=()) -> str:
        """The translation unit the simulator compiles: shim + the same text + a launcher."""
        func = re.sub(r"\W", "_", kernel_name(self.name, template, inputs, output_dtypes))
        args = self.args(inputs, output_dtypes)
        fibers = bool(SYNC.search(self.header + self.source))
        inst = func + (template_text(template) if template else "")
        call = ", ".join(a.call for a in args)
        return "\n".join([
            '#include "shim.h"',
            f'#line 1 "{self.name}:header"',
            rewrite(self.header),
            f'#line 1 "{self.name}:signature"',
            self.signature(func, template, args),
            f'#line 1 "{self.name}.metal"',
            rewrite(self.source),
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


TG_DECL = re.compile(
    r"^(?P<indent>[ \t]*)threadgroup\s+(?P<type>[A-Za-z_][\w:<>, ]*?)\s+(?P<name>[A-Za-z_]\w*)"
    r"\s*(?P<dims>(?:\[[^\]]+\])*)\s*;", re.MULTILINE)
HALF_LITERAL = re.compile(r"(?<![\w.])(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?[hH]\b")
METAL_INCLUDE = re.compile(r"^\s*#\s*include\s*<metal_\w+>.*$", re.MULTILINE)


def rewrite(text: str) -> str:
    """MSL -> C++ for the shim: threadgroup declarations become per-threadgroup arena
    slots (poisoned, shared by the group), ``1.0h`` literals become ``half``, and
    ``#include <metal_*>`` lines go (the line count is kept for ``#line``)."""
    counter = iter(range(1, 1 << 30))
    text = METAL_INCLUDE.sub("", text)
    text = TG_DECL.sub(lambda m: (f"{m['indent']}auto& {m['name']} = ::mlxkv_sim::tg_alloc<"
                                   f"{m['type']}{m['dims']}>({next(counter)});"), text)
    return HALF_LITERAL.sub(lambda m: f"((half)({m[1]}{m[2] or ''}))", text)


