import mlxkv  # noqa: F401  (loads OpenBLAS before mlx, see mlxkv/_blas.py)

import contextlib

import mlx.core as mx
import pytest

from mlxkv.kernels._metal import kernel_factory


# What each test is, by tier: ``model`` (the real default model), ``process`` (starts
# other processes: tensor-parallel groups, wheel builds, servers, a terminal, the CLI),
# else by what it tests, in one process on tiny random-weight models and kernels:
# ``kernel``, ``cache`` or ``unit``. `pytest -m "unit or cache or kernel"` runs those alone.
PROCESS_MODULES = ("test_distributed", "test_packaging", "test_layers", "test_cli", "test_server")
TIERS = {
    "kernel": ("test_kernels", "test_metalsim", "test_metal_strict"),
    "cache": ("test_caches", "test_policies", "test_middle", "test_codebook", "test_budget",
              "test_persist_compat"),
}


def pytest_collection_modifyitems(items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if "smollm" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.model)
        elif module in PROCESS_MODULES:
            item.add_marker(pytest.mark.process)
        if item.get_closest_marker("model") or item.get_closest_marker("process"):
            continue
        tier = next((t for t, modules in TIERS.items() if module in modules), "unit")
        item.add_marker(getattr(pytest.mark, tier))


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
def simulator():
    """The Metal simulator. Its compiled kernels are kept between runs in the user's
    cache directory (``MLXKV_CACHE_DIR`` overrides), keyed by a hash of everything that
    goes into them, so a second run compiles only what changed."""
    from mlxkv.metalsim import Simulator

    return Simulator()


@pytest.fixture
def kernels_built_by():
    """``kernels_built_by(make)``: mlxkv's kernels are built by ``make`` (a simulator's
    ``metal_kernel``, or a wrapper of one) until the test ends."""
    with contextlib.ExitStack() as stack:
        yield lambda make: stack.enter_context(kernel_factory(make))


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
