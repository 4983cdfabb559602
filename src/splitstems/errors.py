"""One error hierarchy for the whole library.

The library raises these with the offending file and the cause in the message;
only :mod:`splitstems.cli` turns them into exit codes and one-line messages.
"""

from __future__ import annotations


class SplitstemsError(Exception):
    """Base class of every error splitstems raises on purpose."""


class AudioError(SplitstemsError):
    """An audio file cannot be read or written (missing, empty, not audio, ...)."""


class ModelError(SplitstemsError):
    """A model cannot be found, downloaded, verified or loaded."""


class ConfigError(SplitstemsError):
    """A model name or JSON configuration is unknown or invalid."""


class CheckpointError(ModelError):
    """A TensorFlow checkpoint is malformed, corrupt or does not fit the model."""


class DownloadError(ModelError):
    """A model archive could not be fetched or failed its checksum."""


class OutputError(SplitstemsError):
    """An output path is invalid (outside the output directory, unwritable, ...)."""
