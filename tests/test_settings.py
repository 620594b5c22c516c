"""Cache settings are declared once, on their ``CacheConfig`` field (``mlxkv.cache.spec``):
each is a ``--kv-*`` flag, a word of ``mlxkv.settings`` (server body fields, models.toml,
eval config files), a ``/kv`` command of the chat app, and part of a saved config."""

import argparse

import pytest

from mlxkv import CacheConfig, settings
from mlxkv.commands.common import add_cache_flags, cache_config_from_args
from mlxkv.errors import InputError
from mlxkv_app.commands import cache_change, parse

SAMPLES = {"size": "1MB", "fraction": "0.5", "policy": "snapkv:window=8"}


def _sample(spec, default):
    """A value of the setting's kind that is not its default."""
    if spec.kind == "flag":
        return None
    if spec.choices:
        return str(next(c for c in reversed(spec.choices) if c != default))
    return SAMPLES[spec.kind] if spec.kind in SAMPLES else str((default or 0) + 3)


@pytest.mark.parametrize("name", list(settings.SETTINGS))
def test_every_setting_reaches_every_way_in(name):
    spec, default = settings.SETTINGS[name]
    value = _sample(spec, default)
    parser = argparse.ArgumentParser()
    add_cache_flags(parser)
    flag = "--kv-" + name.replace("_", "-")
    args = parser.parse_args([flag] if value is None else [flag, value])
    from_flag = cache_config_from_args(args)
    assert getattr(from_flag, name) != default
    word = True if value is None else value
    assert settings.apply(CacheConfig(), {f"kv_{name}": word}) == from_flag  # a body field
    assert cache_change(CacheConfig(), parse(f"/kv {name.replace('_', '-')} {word}")) == from_flag
    assert CacheConfig(**from_flag.to_dict()) == from_flag  # saved with a cache


def test_words_are_read_by_their_kind():
    c = settings.apply(CacheConfig(), {"window": "off", "floor": "0.25", "rotate": "on",
                                       "kv-policy": "H2O"})
    assert (c.window, c.floor, c.rotate, c.policy) == (None, 0.25, True, "h2o")
    for words, needle in (({"sinks": "off"}, "sinks cannot be off"),
                          ({"floor": "half"}, "floor must be a number"),
                          ({"rotate": "maybe"}, "rotate must be on or off"),
                          ({"frob": 1}, "unknown cache setting 'frob'")):
        with pytest.raises(InputError, match=needle):
            settings.apply(CacheConfig(), words)
