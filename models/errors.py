"""Typed domain errors shared by the engine, the workers and the server.

Torch-free on purpose: the server imports this module to map each error to one HTTP status in one
table. Messages quote the bad value and end with a hint on how to fix it.
"""

from __future__ import annotations


class DiffuserveError(Exception):
    """Base class. ``kind`` labels metrics and the error's JSON ``type``; ``param`` names the field."""

    kind = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(DiffuserveError):
    """The caller asked for something out of range or malformed (HTTP 422)."""

    kind = "invalid_request_error"


class NotFound(DiffuserveError):
    kind = "not_found_error"


class ModelNotFound(NotFound):
    kind = "model_not_found"


class AdapterNotFound(NotFound):
    kind = "adapter_not_found"


class InvalidModel(DiffuserveError):
    """A model directory or weights file is missing, malformed or unsafe (an operator's problem)."""

    kind = "invalid_model_error"


class InvalidAdapter(InvalidModel):
    kind = "invalid_adapter_error"


class Overloaded(DiffuserveError):
    kind = "overloaded_error"


class GenerationFailed(DiffuserveError):
    kind = "generation_failed"
