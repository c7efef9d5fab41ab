"""User-facing errors and the exit codes the CLI maps them to."""

from __future__ import annotations

__all__ = [
    "EXIT_FAILED",
    "EXIT_USAGE",
    "CompileError",
    "FidelityError",
    "GateFailedError",
    "InputError",
    "OnnxqError",
    "OutputWriteError",
    "VerificationError",
]

# Exit codes are part of the CLI contract that CI scripts depend on.
EXIT_FAILED = 1  # the tool ran, and the result is a failure (gate, verification)
EXIT_USAGE = 2  # bad input or usage: nothing was produced


class OnnxqError(Exception):
    """Base class of errors shown to the user as one line, without a traceback."""

    exit_code = EXIT_USAGE


class InputError(OnnxqError):
    """A file, flag or data set given by the user cannot be used."""


class OutputWriteError(InputError, OSError):
    """An output cannot be written (no permission, disk full); the message names the output.

    Also an OSError, which is what callers of the writers have always caught.
    """


class CompileError(OnnxqError):
    """The model cannot be compiled as asked (e.g. an op a pass cannot handle)."""


class VerificationError(OnnxqError):
    """A compiled model does not match its reference closely enough."""

    exit_code = EXIT_FAILED


class FidelityError(VerificationError):
    """The int8 model's outputs are further from fp32 than the fidelity criteria allow."""


class GateFailedError(OnnxqError):
    """A release gate threshold does not hold."""

    exit_code = EXIT_FAILED
