"""Error types that carry the CLI exit code documented in docs/design.md.

Core code raises these with a one-line message saying what failed and what to do; the CLI prints
the message and exits with the code. Anything else is an unexpected error (exit 1)."""

from __future__ import annotations

from collections.abc import Sequence


class LoraqError(Exception):
    exit_code = 1


class BadArguments(LoraqError):
    """Bad command-line arguments or config (exit 2)."""

    exit_code = 2


class GateFailed(LoraqError):
    """A quality gate failed (exit 3); `failures` holds the message's loraq.compare.gates.GateFailure
    records (typed `object` here: this module sits below loraq.compare)."""

    exit_code = 3

    def __init__(self, message: str, failures: Sequence[object] = ()) -> None:
        super().__init__(message)
        self.failures = tuple(failures)


class BadInput(LoraqError):
    """Bad input data: corrupt file, shape or architecture mismatch, NaN/Inf (exit 4)."""

    exit_code = 4


class IOFailure(LoraqError):
    """Disk full, permission denied and other I/O failures (exit 5)."""

    exit_code = 5


def shown(text: str, limit: int = 80) -> str:
    """Untrusted text (a key, a tensor name, a pattern) as it may appear in a one-line message:
    control and other non-printable characters escaped, at most `limit` characters kept."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit] + "…"
