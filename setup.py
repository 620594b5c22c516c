"""Everything is configured in pyproject.toml; this only adds the start-up hook
``mlxkv-blas.pth`` at the top of site-packages (see mlxkv/_blas.py), in wheels and in
editable installs alike."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "mlxkv-blas.pth"
# One line, run by Python's site module at start-up: it loads mlxkv/_blas.py on its own
# (without importing the mlxkv package or mlx) and adds its import hook.
HOOK = ("import sys, importlib.util as u; s = sys.platform.startswith('linux') and u.find_spec('mlxkv'); "
        "f = s and u.spec_from_file_location('_mlxkv_blas', "
        "s.submodule_search_locations[0] + '/_blas.py'); m = f and u.module_from_spec(f); "
        "m and (f.loader.exec_module(m), getattr(m, 'install_hook', bool)())\n")


class build_py_with_hook(build_py):
    def run(self):
        super().run()
        # In an editable install setuptools builds into a throw-away folder and ships the
        # install folder (the wheel's root) instead.
        root = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, PTH), "w") as f:
            f.write(HOOK)

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": build_py_with_hook})
