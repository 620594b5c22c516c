"""Errors that mlxkv reports to users as one clear line (no traceback)."""


class MlxkvError(Exception):
    """Base class: the message names the problem and is shown to the user as is."""


class ModelNotFoundError(MlxkvError):
    """An alias or path that resolves to no model."""


class ModelFileError(MlxkvError):
    """A model file that is missing, truncated, corrupt or of an unsupported kind."""


class InputError(MlxkvError):
    """Invalid user input: sampling values, prompts, cache settings."""


class CacheFileError(MlxkvError):
    """A saved cache that cannot be loaded into this model or configuration."""


class ConfigFileError(MlxkvError):
    """A configuration file (``models.toml``, an eval config) that cannot be read."""


class GroupError(MlxkvError):
    """A distributed group that cannot be formed, does not fit the model, or lost a rank."""
