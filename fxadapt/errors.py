"""Typed errors. Each one names what is wrong: the field, the site, the adapter, the input or the file."""

from __future__ import annotations


class FxAdaptError(Exception):
    """Base class of every error fxadapt raises on purpose."""


class ConfigError(FxAdaptError, ValueError):
    """A config field has a value fxadapt cannot use, or a config id is unknown."""

    def __init__(self, message: str, *, field: str | None = None, value: object = None):
        super().__init__(message)
        self.field = field
        self.value = value


class CaptureError(FxAdaptError, RuntimeError):
    """The model could not be captured as a graph; the message says why and what to pass."""


class SiteError(FxAdaptError, LookupError):
    """A config asks for a site (role, layer or module path) the model does not have."""


class AdapterError(FxAdaptError, LookupError):
    """An adapter name is unknown or taken, or the adapter is in the wrong state (merged, gated)."""


class InputError(FxAdaptError, TypeError):
    """A call passes inputs the captured graph cannot take."""


class MergeError(FxAdaptError, RuntimeError):
    """An adapter cannot be folded into the weights."""


class DrawError(FxAdaptError, ValueError):
    """A graph picture could not be drawn: unknown file type, matplotlib missing, file not writable."""


class ExportError(FxAdaptError, RuntimeError):
    """A model could not be written as .pt2 / .onnx: the message names the file and the cause."""


class CheckpointError(FxAdaptError, ValueError):
    """A checkpoint file or directory is missing, unsafe, corrupt or does not fit the model."""

    def __init__(self, message: str, *, path: str | None = None, tensor: str | None = None):
        super().__init__(message)
        self.path = path
        self.tensor = tensor
