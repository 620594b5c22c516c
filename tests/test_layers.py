"""The layering contract in pyproject.toml ([tool.importlinter]), checked by import-linter:
app -> commands -> bench/eval -> chat -> generation -> cache -> kernels/policies, no cycles;
and the product's code never imports the tooling (the Metal simulator)."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_layers_hold():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is a test dependency (pip install -e '.[test]')"
    r = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "1 kept, 0 broken" in r.stdout


def test_product_code_never_imports_the_metal_simulator():
    """``import mlxkv``, the CLI's modules and a generation on a compressed cache leave
    the simulator (tooling for tests and ``bench --simulate``) unimported."""
    code = """
import sys
import mlxkv, mlxkv.cli, mlxkv.commands.generate, mlxkv.commands.chat, mlxkv.commands.serve
import mlx.core as mx
from mlx_lm.models import llama
args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=1,
                       intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                       rms_norm_eps=1e-5, vocab_size=64, head_dim=32, tie_word_embeddings=True)
model = llama.Model(args)
mlxkv.route(model)
cache = mlxkv.make_cache(model, mlxkv.CacheConfig(key_bits=4, value_bits=4, window=40))
for _ in range(3):
    mx.eval(model(mx.array([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]), cache=cache))
print(sorted(m for m in sys.modules if m.startswith("mlxkv.metalsim") or m == "mlxkv.kernel_bench"))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"
