"""The one base class of featurize's refusals: the CLI catches it, prints its message on one line
and exits 2; the API raises it as it is (`featurize.Refused`)."""
from __future__ import annotations

from .redact import RedactedError


class Refused(RedactedError):
    """A command that cannot run as asked (a bad job file, an unreachable source, an unknown model,
    an output holding another job's ...). Nothing was written or lost; fix the cause and run again."""


class OutputExists(Refused, RuntimeError):
    """The output root holds another job's output, or cannot be used as asked."""
