"""The ``mlxkv`` command end to end, in subprocesses, on the real default model."""

import subprocess
import sys

import pytest


def run(*args, stdin=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "mlxkv.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def test_generate_paris_verbose(smollm):
    r = run("generate", "What is the capital of France?", "--max-tokens", "24", "-v")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "tokens/s" in r.stderr and "KV cache" in r.stderr


def test_generate_from_stdin_with_quantized_window(smollm):
    r = run("generate", "--max-tokens", "24", "--kv-bits", "8", "--kv-group-size", "32",
            "--max-kv-size", "256", stdin="What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["generate", "hi", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["generate", "hi", "--kv-bits", "5"], "argument --kv-bits: invalid choice: 5"),
    (["generate", "hi", "--kv-bits", "4", "--kv-group-size", "128"], "does not divide the head dim"),
    (["generate", "hi", "--top-p", "0"], "top_p"),
    (["generate", "hi", "--kv-residual", "16"], "residual only applies"),
    (["generate", "hi", "--model", "/nonexistent/model.gguf"], "unknown model"),
    (["generate", "   "], "prompt is empty"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle, smollm):
    r = run(*args, stdin="")
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bad_kernel_mode_is_one_line(smollm):
    import os

    r = subprocess.run([sys.executable, "-m", "mlxkv.cli", "generate", "hi", "--kv-bits", "4"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "MLXKV_KERNELS": "gpu"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == ("mlxkv: error: MLXKV_KERNELS='gpu' is not a kernel mode: set it "
                                "to one of auto, metal, reference, or unset it")


def test_debug_shows_traceback():
    r = run("--debug", "generate", "hi", "--model", "no-such-model")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_models_list_and_path(smollm):
    r = run("models")
    assert r.returncode == 0 and "smollm2-135m" in r.stdout and "qwen3-0.6b" in r.stdout
    r = run("models", "path", "smollm2-135m")
    assert r.returncode == 0 and r.stdout.strip().endswith(".gguf")


def test_chat_repl_reuses_history(smollm):
    r = run("chat", "--max-tokens", "24",
            stdin="What is the capital of France?\nRepeat the city name.\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Paris") >= 2
    assert "group 32" in r.stdout.splitlines()[0]  # the model's default (models.toml) is shown


def test_bench_writes_rows_with_ratios(smollm, tmp_path):
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    r = run("bench", "--contexts", "40", "80", "--decode", "2", "--window", "32",
            "--config", "mlxkv 4-bit", "--config", "mlxkv window 32", "--json", str(out),
            "--markdown", str(md))
    assert r.returncode == 0, r.stderr
    import json

    rows = json.loads(out.read_text())
    assert [(x["config"], x["context"]) for x in rows] == [
        ("mlx-lm KVCache", 40), ("mlxkv 4-bit", 40), ("mlxkv window 32", 40),
        ("mlx-lm KVCache", 80), ("mlxkv 4-bit", 80), ("mlxkv window 32", 80)]
    base = rows[3]
    assert base["ratio"] == 1.0
    quant = rows[4]
    assert quant["kv_bytes"] < base["kv_bytes"] / 3
    assert rows[5]["kv_bytes"] == rows[2]["kv_bytes"]  # the window does not grow
    assert "| mlxkv 4-bit | 80 |" in md.read_text()
    r = run("bench", "--config", "nope")
    assert r.returncode == 2 and "unknown bench config" in r.stderr
