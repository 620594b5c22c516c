"""The built wheel: non-colliding app package, package data, importable from a fresh venv."""

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_layout_and_fresh_venv_import(tmp_path):
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = out.glob("mlxkv-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mlxkv/models.toml" in names
    assert "mlxkv_app/__init__.py" in names
    assert {"mlxkv_app/mlxkv.tcss", "mlxkv_app/widgets/cache_panel.py",
            "mlxkv_app/screens/help.py"} <= set(names)
    assert "mlxkv_metal/__init__.py" in names
    assert not any(n.startswith("app/") for n in names)
    shipped_metal = {n.split("/")[-1] for n in names if n.endswith(".metal")}
    assert shipped_metal == {p.name for p in (ROOT / "metal_kernels").glob("*.metal")}
    assert {"mlxkv_metal/kv_attention.h", "mlxkv/metalsim/shim.h"} <= set(names)
    assert "mlxkv-blas.pth" in names  # the start-up hook, at the top of site-packages

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)  # what pip does for a pure-Python wheel
    deps = sysconfig.get_paths()["purelib"]  # mlx, mlx-lm, ... from the test environment
    code = ("import mlx.core, mlxkv, mlxkv_app, mlxkv_metal, importlib.util, importlib.resources as r;"
            "print(mlxkv.__file__);"
            "print(importlib.util.find_spec('app'));"
            "print(r.files('mlxkv').joinpath('models.toml').read_text()[:2000].count('[models.'));"
            "import mlxkv_app.app as a, pathlib;"
            "print((pathlib.Path(a.__file__).parent / a.ChatApp.CSS_PATH).is_file());"
            "print(mlxkv._blas.mlx_uses_openblas())")
    res = subprocess.run([py, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": deps, "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    location, app_spec, n_models, css, openblas = res.stdout.strip().splitlines()
    if sys.platform.startswith("linux"):  # mlx imported first: the hook still loaded it
        from mlxkv._blas import find_openblas

        assert openblas == str(bool(find_openblas()))
    assert css == "True"
    assert location.startswith(site)
    assert app_spec == "None"
    assert int(n_models) >= 1
