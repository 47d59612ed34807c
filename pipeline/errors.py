"""featurize's error bases and exit codes.

`Refused`: a command that cannot run as asked. The CLI catches it once (cli.main), prints its
message on one line and exits 2; the API raises it as it is (`featurize.Refused`).
`SampleError`: one sample that failed; it becomes that sample's error row (never an exception out
of the job), its `error_type` the row's short kind.
"""
from __future__ import annotations

from .redact import RedactedError

EXIT_OK, EXIT_FAILED, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 130


class Refused(RedactedError):
    """A command that cannot run as asked (a bad job file, an unreachable source, an unknown model,
    an output holding another job's ...). Nothing was written or lost; fix the cause and run again."""


class OutputExists(Refused, RuntimeError):
    """The output root holds another job's output, or cannot be used as asked."""


class NoOutput(Refused, FileNotFoundError):
    """No featurize output where one was named (a typo'd path): `status` and `inspect` say so."""


class SampleError(Exception):
    """A sample that failed: its error row's `error_type` is this class's (or, where empty, the
    class's name); the stage that caught it fills `error_stage`."""

    error_type = ""

    def __init__(self, message: str = "", error_type: str = ""):
        super().__init__(message)
        if error_type:
            self.error_type = error_type

    @property
    def kind(self) -> str:
        return self.error_type or type(self).__name__


class EvalError(Refused, ValueError):
    """An evaluation that cannot run as asked (featurize eval, featurize.evaluate): names the problem."""
