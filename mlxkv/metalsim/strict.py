"""The simulator's strict front end: reject what Apple's Metal compiler rejects.

The simulator compiles kernels as GNU C++ against ``shim.h``, where ``device``,
``constant`` and ``threadgroup`` mean nothing, so kernels Metal refuses would run. Before
that, each instantiation goes through two checks of the same generated source:

- ``clang++ -fsyntax-only`` against ``strict.h``: address spaces are types (a helper
  taking ``const device T*`` refuses an input MLX binds as ``constant``, i.e. one under 8
  elements), C++14 without exceptions or RTTI, variable-length arrays are errors, no
  standard library (``std::``), no ``double``/``new``/``malloc``, MLX's prelude names
  declared (redefining one fails), threadgroup arrays only at kernel scope, at most
  32 KiB of them (``static_assert`` on the running total);
- text checks clang cannot make: static locals, recursion.

Errors name the ``.metal`` file (or header) and line. Needs clang (Debian: ``apt-get
install clang``; ``MLXKV_SIM_CLANG`` names another binary).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

from .source import HALF_LITERAL, METAL_INCLUDE, TG_DECL, Spec, template_text

MAX_THREADGROUP_BYTES = 32768
CLANG_FLAGS = ["-target", "arm64-apple-macos", "-std=c++14", "-fsyntax-only", "-fno-exceptions", "-fno-rtti", "-Werror=vla",
               "-Wno-unknown-attributes", "-Wno-keyword-macro", "-Wno-stdlibcxx-not-found", "-Wno-unused-value",
               "-ferror-limit=20", "-x", "c++"]

_STATIC_LOCAL = re.compile(r"^\s*static\s+(?!_assert\b|_cast\b)", re.MULTILINE)
_FUNCTION = re.compile(r"^[A-Za-z_][\w:<>,\s\*&]*?\b(?P<name>[A-Za-z_]\w*)\s*\([^;{}]*\)\s*\{",
                       re.MULTILINE)
_HINTS = {
    "automatic variable qualified with an address space":
        "threadgroup memory is declared at kernel scope only",
    "no matching function for call":
        "check the address spaces: MLX binds inputs under 8 elements as `constant`",
}


class StrictError(Exception):
    """What the strict front end found (the simulator turns it into a SimulatorError)."""


def clang() -> tuple[str, str]:
    """The clang binary and its version line."""
    cxx = os.environ.get("MLXKV_SIM_CLANG", "clang++")
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise StrictError(f"the strict Metal front end needs clang ({cxx}: {e}); install it "
                          "(Debian: apt-get install clang) or use Simulator(strict=False)") from None
    return cxx, out.stdout.splitlines()[0]


def _bodies(text: str):
    """(name, first line, body) of each function defined at the top level of ``text``."""
    for m in _FUNCTION.finditer(text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        yield m["name"], text.count("\n", 0, m.start()) + 1, text[m.end() : i - 1]


def _strip_comments(text: str) -> str:
    """Comments blanked, line count kept."""
    text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m[0].count("\n"), text, flags=re.DOTALL)
    return re.sub(r"//[^\n]*", "", text)


def text_checks(spec: Spec, header_name: str) -> list[str]:
    """What clang lets through but Metal does not: static locals, recursion."""
    problems = []
    body = _strip_comments(spec.source)
    for m in _STATIC_LOCAL.finditer(body):
        line = body.count("\n", 0, m.start()) + 1
        problems.append(f"{spec.name}.metal:{line}: error: static local variable (not in Metal)")
    header = _strip_comments(spec.header_body)
    for name, line, fbody in _bodies(header):
        if _STATIC_LOCAL.search(fbody):
            problems.append(f"{header_name}:{line}: error: static local variable in {name} "
                            "(not in Metal)")
        if re.search(rf"\b{re.escape(name)}\s*(<[^;()]*>)?\s*\(", fbody):
            problems.append(f"{header_name}:{line}: error: {name} calls itself (Metal has no "
                            "recursion)")
    return problems


def _strict_body(source: str) -> str:
    """Kernel-scope threadgroup arrays as references into an arena, each followed by a
    ``static_assert`` on the running total of threadgroup bytes (same line)."""
    counter = iter(range(1, 1 << 30))

    def decl(m):
        k = next(counter)
        kind = f"{m['type']}{m['dims']}"
        return (f"{m['indent']}auto& {m['name']} = ::mlxkv_strict::tg_alloc<{kind}>({k}); "
                f"constexpr size_t mlxkv_tg_{k} = mlxkv_tg_{k - 1} + sizeof({kind}); "
                f"static_assert(mlxkv_tg_{k} <= ::mlxkv_strict::max_threadgroup_bytes, "
                f"\"more than {MAX_THREADGROUP_BYTES} bytes of threadgroup memory (Apple GPUs' "
                "limit)\");")

    return "constexpr size_t mlxkv_tg_0 = 0; " + TG_DECL.sub(decl, source)


def _plain(text: str) -> str:
    text = METAL_INCLUDE.sub("", text)
    return HALF_LITERAL.sub(lambda m: f"half({m[1]}{m[2] or ''}f)", text)


def source(spec: Spec, inputs, output_dtypes, template, header_name: str) -> str:
    """The translation unit of the strict pass: ``strict.h``, then what MLX compiles."""
    from .source import kernel_name

    func = re.sub(r"\W", "_", kernel_name(spec.name, template, inputs, output_dtypes))
    parts = ['#include "strict.h"', f'#line 1 "{header_name}"', _plain(spec.header),
             f'#line 1 "{spec.name}:signature"',
             spec.signature(func, template, spec.args(inputs, output_dtypes)),
             f'#line 1 "{spec.name}.metal"', _strict_body(_plain(spec.source)), "}"]
    if template:
        inst = func + template_text(template)
        parts += ['#line 1 "metalsim:instantiation"', f"template decltype({inst}) {inst};"]
    return "\n".join(parts) + "\n"


def check(spec: Spec, inputs, output_dtypes, template, *, include: Path) -> None:
    """Raise ``StrictError`` naming file and line of what Apple's compiler would reject."""
    header_name = spec.header_name or f"{spec.name}:header"
    problems = text_checks(spec, header_name)
    cxx, _ = clang()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{spec.name}.strict.cpp"
        path.write_text(source(spec, inputs, output_dtypes, template, header_name))
        proc = subprocess.run([cxx, *CLANG_FLAGS, "-I", str(include), str(path)],
                              capture_output=True, text=True)
    if proc.returncode:
        for line in proc.stderr.splitlines():
            if ": error:" not in line:
                continue
            hint = next((h for k, h in _HINTS.items() if k in line), None)
            problems.append(line + (f" ({hint})" if hint else ""))
        if not problems:
            problems.append(proc.stderr.strip()[:2000])
    if problems:
        raise StrictError("\n".join(problems[:20]))
