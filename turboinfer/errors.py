"""Errors a user can act on. The CLI prints their message as one line and exits non-zero."""


class TurboInferError(Exception):
    """Base class: the message names the problem and, where there is one, the fix."""


class ModelNotFoundError(TurboInferError):
    """The model name is not a file, a directory, an alias or a reachable hub id."""


class ModelLoadError(TurboInferError):
    """The model files exist but cannot be used (corrupt, truncated, missing tensors)."""


class UnsupportedModelError(TurboInferError):
    """The architecture or a feature of the checkpoint is not implemented."""


class InvalidRequestError(TurboInferError, ValueError):
    """A prompt or sampling parameter is out of range. Also a ValueError so callers can catch either.
    `param` names the request field at fault and `code` an OpenAI error code, for the server's error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code
