"""``mlxkv eval``: metric functions against hand-computed values, small real runs."""

import json
import math
import subprocess
import sys

import mlx.core as mx
import pytest

from mlxkv.cache.config import CacheConfig
from mlxkv.cache.make import make_cache
from mlxkv.errors import InputError
from mlxkv.evaluation import (REFERENCE, kl_divergence, log_softmax, nll, passkey, passkey_prompt,
                              perplexity, quality)
from mlxkv.settings import configs_from_toml as load_config_file
from mlxkv.texts import load_text


def test_kl_of_identical_distributions_is_zero_and_known_value():
    logits = mx.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    lp = log_softmax(logits)
    assert mx.allclose(kl_divergence(lp, lp), mx.zeros(2), atol=1e-7).item()
    p, q = mx.log(mx.array([[0.5, 0.5]])), mx.log(mx.array([[0.9, 0.1]]))
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert abs(kl_divergence(p, q).item() - expected) < 1e-6


def test_perplexity_of_a_uniform_distribution_is_the_vocab_size():
    V, N = 50, 7
    lp = log_softmax(mx.zeros((N, V)))
    targets = mx.arange(N)
    assert abs(perplexity(nll(lp, targets).sum().item(), N) - V) < 1e-3
    # A model certain of the right token has perplexity 1.
    sure = log_softmax(mx.where(mx.arange(V)[None] == targets[:, None], 100.0, 0.0))
    assert abs(perplexity(nll(sure, targets).sum().item(), N) - 1) < 1e-6


def test_user_text_and_errors(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello world")
    assert load_text(str(f)) == "hello world"
    with pytest.raises(InputError, match="no text 'nope'"):
        load_text("nope")
    bad = tmp_path / "c.toml"
    bad.write_text('[configs."x"]\nkey_bits = 5\n')
    with pytest.raises(InputError, match="key_bits must be one of"):
        load_config_file(str(bad))
    bad.write_text("nothing = 1\n")
    with pytest.raises(InputError, match="no \\[configs"):
        load_config_file(str(bad))


def test_tempest_comes_from_the_sdist():
    text = load_text("tempest")
    assert "Prospero" in text and len(text) > 50_000


def test_quality_on_the_real_model(smollm):
    model, tok = smollm
    tokens = list(tok.encode(load_text("tempest")))[:400]
    rows = quality(model, tokens, {
        REFERENCE: None,
        "full": lambda: make_cache(model, CacheConfig()),
        "8-bit": lambda: make_cache(model, CacheConfig(key_bits=8, value_bits=8, group_size=32)),
        "2-bit": lambda: make_cache(model, CacheConfig(key_bits=2, value_bits=2, group_size=32)),
        "window 64": lambda: make_cache(model, CacheConfig(window=60, sinks=4)),
    }, chunk=64)
    ref = rows[REFERENCE]
    assert 5 < ref.ppl < 200 and ref.kld == 0 and ref.top1 == 1
    # mlxkv's full cache is the same computation as the reference.
    assert abs(rows["full"].ppl - ref.ppl) < 1e-3 * ref.ppl and rows["full"].kld < 1e-6
    assert abs(rows["8-bit"].ppl_delta_pct) < 1 and rows["8-bit"].kld < 0.01
    assert rows["2-bit"].kld > rows["8-bit"].kld and rows["window 64"].kld > rows["8-bit"].kld
    assert rows["8-bit"].kv_bytes < ref.kv_bytes / 2


def test_passkey_prompt_and_retrieval(smollm):
    model, tok = smollm
    prompt = passkey_prompt(tok, 600, 0.5, 48213)
    assert 500 < len(prompt) <= 600 and "48213" in tok.decode(prompt)
    acc = passkey(model, tok, {"full": lambda: make_cache(model, CacheConfig()),
                               "window 32": lambda: make_cache(model, CacheConfig(window=28))},
                  lengths=[600], depths=[0.1], trials=2)
    # The full cache finds it; a 32-token window long past the needle cannot.
    assert acc["full"] == {"600@10": 1.0} and acc["window 32"] == {"600@10": 0.0}


def test_eval_cli_writes_json_table_and_plots(smollm, tmp_path):
    cfg = tmp_path / "configs.toml"
    cfg.write_text('[configs."4-bit rotated"]\nkey_bits = 4\nvalue_bits = 4\n'
                   'group_size = 32\nrotate = true\n')
    out = tmp_path / "eval"
    r = subprocess.run([sys.executable, "-m", "mlxkv.cli", "eval", "--tokens", "200", "--chunk",
                        "64", "--config", "mlxkv 8-bit", "--config-file", str(cfg),
                        "--passkey-lengths", "300", "--depths", "50", "--json", f"{out}.json",
                        "--markdown", f"{out}.md", "--plot", str(out), "--quiet"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "eval.json").read_text())
    assert [row["config"] for row in doc["rows"]] == [REFERENCE, "mlxkv 8-bit", "4-bit rotated"]
    assert all(row["passkey"] == {"300@50": row["passkey_accuracy"]} for row in doc["rows"])
    assert "| 4-bit rotated |" in (tmp_path / "eval.md").read_text() and "| mlxkv 8-bit |" in r.stdout
    for png in ("eval-quality.png", "eval-passkey.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    quick = subprocess.run([sys.executable, "-m", "mlxkv.cli", "eval", "--tokens", "64", "--chunk",
                            "32", "--config", "mlxkv 8-bit", "--passkey-lengths", "--quiet"],
                           capture_output=True, text=True, timeout=600)  # no passkey test
    assert quick.returncode == 0, quick.stderr
    assert "| mlxkv 8-bit |" in quick.stdout and quick.stdout.count("| - |") == 2
    bad = subprocess.run([sys.executable, "-m", "mlxkv.cli", "eval", "--depths", "50", "x"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "argument --depths: invalid int value: 'x'" in bad.stderr


def test_frontier_plot_lines_families_and_keeps_every_point_inside(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mlxkv.evaluation.metrics import EvalRow
    from mlxkv.evaluation.report import family, quality_plot

    assert family("mlx-lm Quantized 4-bit") == "mlx-lm affine"
    assert family("mlxkv 3-bit codebook") == "mlxkv codebook"
    assert family("mlxkv 4-bit rotated") == "mlxkv affine rotated"
    assert family("mlxkv codebook K3 V2") is None and family("mlxkv window 512") is None
    assert family("mlxkv 2-bit codebook, 4-bit middle 256") == "mlxkv codebook + 4-bit middle"
    assert family("mlxkv 2-bit codebook, 3-bit middle 768") == "mlxkv codebook + 3-bit middle"
    assert family("mlxkv 3-bit codebook, 1 outlier") is None
    rows = [EvalRow(config=c, kv_bytes=1, bits_per_element=b, ppl=1.0, ppl_delta_pct=d, kld=0.0, top1=1.0)
            for c, b, d in (("mlx-lm KVCache", 32.01, 0.0), ("mlxkv 2-bit codebook", 2.26, 10.3),
                            ("mlx-lm Rotating 512", 47.9, 71.8), ("mlxkv 3-bit codebook", 3.26, -0.2))]
    seen = {}
    real_close = plt.close
    plt.close = lambda fig: seen.setdefault("ax", fig.axes[0])  # keep the axes to look at
    try:
        quality_plot(rows, str(tmp_path / "q.png"), plt)
    finally:
        plt.close = real_close
    ax = seen["ax"]
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    for r in rows:  # strictly inside: nothing drawn on (or past) an edge
        assert x0 < r.bits_per_element < x1 and y0 < r.ppl_delta_pct < y1
    assert (tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG"
    assert len(ax.get_lines()) == 1  # one family line (codebook); the others are points
