"""OpenBLAS under MLX's CPU backend whatever the import order (mlxkv/_blas.py, setup.py)."""

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from mlxkv import _blas

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the reference-BLAS problem is specific to mlx[cpu] on Linux")

ORDER = """
{imports}
mx.eval(mx.ones((4, 4)) @ mx.ones((4, 4)))
import mlxkv._blas as b
print(b.mlx_uses_openblas())
"""


def _mlx_on_openblas(imports: str) -> bool:
    """Whether MLX came up on OpenBLAS in a fresh process importing as ``imports`` says
    (the dynamic linker's load order: OpenBLAS before libmlx; not a timing)."""
    res = subprocess.run([sys.executable, "-c", ORDER.format(imports=imports)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()[-1] == "True"


@linux_only
def test_start_up_hook_is_installed():
    sites = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    assert any((Path(s) / "mlxkv-blas.pth").is_file() for s in sites), \
        "pip install -e . puts mlxkv-blas.pth into site-packages"


@linux_only
@pytest.mark.process  # starts interpreters
def test_import_order_does_not_matter():
    expected = bool(_blas.find_openblas())  # a machine without OpenBLAS: neither order has it
    assert _mlx_on_openblas("import mlx.core as mx\nimport mlxkv") == expected
    assert _mlx_on_openblas("import mlxkv\nimport mlx.core as mx") == expected


@linux_only
@pytest.mark.process  # starts interpreters
def test_mlx_first_gets_openblas_through_the_hook_alone():
    """Without importing mlxkv at all, a process of this environment has OpenBLAS under
    MLX when the machine has one (the hook acts on ``import mlx``)."""
    code = ("import mlx.core as mx; mx.eval(mx.ones((4, 4)) @ mx.ones((4, 4)));"
            "import mlxkv._blas as b; print(b.mlx_uses_openblas())")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(bool(_blas.find_openblas()))


@linux_only
@pytest.mark.process  # starts interpreters
def test_one_warning_says_why_when_mlx_came_up_without_openblas():
    """The hook removed (as in an uninstalled checkout) and mlx imported first: importing
    mlxkv warns once, naming the cause and what to do."""
    code = ("import sys, warnings; warnings.simplefilter('always');"
            "sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != '_BeforeMlx'];"
            "import mlx.core; import mlxkv")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("RuntimeWarning") == 1, res.stderr
    expected = "mlxkv-blas.pth" if _blas.find_openblas() else "libopenblas0"
    assert expected in res.stderr and "MLXKV_BLAS=0" in res.stderr
    silenced = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=120, env={**__import__("os").environ, "MLXKV_BLAS": "0"})
    assert "RuntimeWarning" not in silenced.stderr


def test_no_openblas_on_the_machine_names_the_package(monkeypatch):
    monkeypatch.setattr(_blas, "wanted", lambda: True)
    monkeypatch.setattr(_blas, "mlx_uses_openblas", lambda: False)
    monkeypatch.setattr(_blas, "find_openblas", lambda: [])
    reason = _blas.slow_blas_reason()
    assert "no OpenBLAS on this machine" in reason and "apt-get install libopenblas0" in reason
    monkeypatch.setattr(_blas, "mlx_uses_openblas", lambda: True)
    assert _blas.slow_blas_reason() is None


def test_the_start_up_hook_does_nothing_on_macos(monkeypatch):
    """On a Mac (Metal and Accelerate) the hook adds no import hook, loads nothing and
    never warns, whatever mlx's state."""
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.delenv("MLXKV_BLAS", raising=False)
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    monkeypatch.delitem(sys.modules, "mlx", raising=False)  # as at interpreter start
    loads = []
    monkeypatch.setattr(_blas, "find_openblas", lambda: loads.append("looked") or ["x"])
    before = list(sys.meta_path)
    assert not _blas.wanted()
    assert _blas.install_hook() is False and sys.meta_path == before
    monkeypatch.delitem(sys.modules, "mlx.core", raising=False)
    assert _blas.preload_openblas() is None
    assert _blas.slow_blas_reason() is None and loads == []

