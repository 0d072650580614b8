"""Errors of the Aligner core.

AlignerError
├── AdapterFormatError      the bytes are not a valid aligner/v1 file (or a malformed one)
│   └── AdapterMismatch     a valid file made for another model shape or base model
└── ModelPrepError          the base model could not be found or converted
"""

from __future__ import annotations


class AlignerError(Exception):
    """Root of every error raised by `aligner_core`."""


class AdapterFormatError(AlignerError):
    """An adapter file that cannot be used; `param` names the offending part when known."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class AdapterMismatch(AdapterFormatError):
    """A well-formed adapter made for a different base model or shape."""


class ModelPrepError(AlignerError):
    """The base model could not be located or converted."""
