"""Errors a user can cause. The CLI prints these as one line; anything else is a bug and keeps its traceback."""


class DraftApproxError(Exception):
    """Base class for every error caused by input, configuration or environment rather than by a bug."""


class ConfigError(DraftApproxError, ValueError):
    """A method, budget or knob value that cannot work."""


class InputError(DraftApproxError, ValueError):
    """A prompt that cannot be processed (empty, too long, not UTF-8)."""


class ModelError(DraftApproxError):
    """A model that cannot be loaded, paired or captured."""


class FetchError(DraftApproxError):
    """A download, checksum or conversion failure while assembling the offline pair."""
