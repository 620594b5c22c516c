import mlxkv  # noqa: F401  (loads OpenBLAS before mlx, see mlxkv/_blas.py)

import mlx.core as mx
import pytest

from mlxkv.kernels._metal import kernel_factory


def pytest_collection_modifyitems(items):
    """Tests on the real default model get the ``model`` mark (``-m "not model"``: the
    fast tests, on tiny random-weight models and kernels)."""
    for item in items:
        if "smollm" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.model)


@pytest.fixture(scope="session")
def smollm():
    """The real default model (fetched once into the user cache dir)."""
    model, tokenizer = mlxkv.load()
    return model, tokenizer


@pytest.fixture(scope="session")
def paris_prompt(smollm):
    _, tok = smollm
    return tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True)


def tiny_model(model_type: str, **overrides):
    """A small random-weight mlx-lm model of the given architecture (for fast unit tests)."""
    import importlib

    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    args = dict(model_type=model_type, hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=512,
                head_dim=32, max_position_embeddings=4096, rope_theta=10000.0,
                tie_word_embeddings=True)
    args.update(overrides)
    args = module.ModelArgs.from_dict(args)
    mx.random.seed(0)
    model = module.Model(args)
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    mlxkv.route(model)
    return model


@pytest.fixture(scope="session")
def simulator(tmp_path_factory):
    """The Metal simulator, compiling into a temp dir of this test session."""
    from mlxkv.metalsim import Simulator

    return Simulator(cache=tmp_path_factory.mktemp("metalsim"))


@pytest.fixture
def metal_sim(simulator, monkeypatch):
    """mlxkv's dispatchers take their Metal path: on a Mac the real GPU (so the kernels
    also go through Apple's compiler), elsewhere the simulator, which is returned."""
    monkeypatch.setenv("MLXKV_KERNELS", "metal")
    if mx.metal.is_available():
        yield None
        return
    with kernel_factory(simulator.metal_kernel):
        yield simulator
