"""User-facing errors.

Every problem a user can cause (a missing file, a corrupt checkpoint, a bad flag) raises a subclass of
`PowerInferError` with a one-line message naming the problem; the CLI prints that line and exits non-zero
instead of showing a traceback.
"""


class PowerInferError(Exception):
    """A problem with the user's input, files or environment, explained in one line."""


class ModelFormatError(PowerInferError):
    """A model file or directory that cannot be read: missing, truncated, corrupt or unsupported."""


class UnsupportedModelError(PowerInferError):
    """A well-formed model whose architecture or options this engine does not implement."""


class ContextOverflowError(PowerInferError):
    """A request that does not fit the model's context window."""
