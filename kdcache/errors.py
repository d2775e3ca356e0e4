"""User-facing errors: each names the problem and, where there is one, the fix."""


class KDCacheError(Exception):
    """An error caused by the user's input (paths, data, options), not by a bug.

    The command-line interface prints these as one clear message and exits with status 2,
    without a traceback.
    """


class DatasetError(KDCacheError):
    """A data set root, split, image or mask is missing, laid out wrongly or inconsistent."""


class CheckpointError(KDCacheError):
    """A checkpoint or state dict cannot be read or does not fit the model."""


class ModelError(KDCacheError):
    """A model name, import path or feature tap cannot be resolved."""


class MissingExtraError(KDCacheError):
    """An option needs an optional package (a pip extra such as ``kdcache[tensorboard]``) that is not installed."""


class ConfigFileError(KDCacheError):
    """A ``--config`` file cannot be read, or holds a key or a value its command does not take."""
