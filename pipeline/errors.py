"""featurize's errors and exit codes: every refusal class is defined here, and the per-sample base;
and two helpers of refusals' words (api_words, did_you_mean).

`Refused`: a command that cannot run as asked. The CLI catches it once (cli.main), prints its
message on one line and exits 2; the API raises it as it is (`featurize.Refused`). Its subclasses
below, grouped by the stage that raises them, let a caller (and a test) tell one cause from another;
a class that also derives from ValueError or RuntimeError keeps that base for the API's users.
`SampleError`: one sample that failed; it becomes that sample's error row (never an exception out
of the job) with its `error_type` and `stage`.
"""
from __future__ import annotations

import difflib
import re
from typing import Sequence, Union

from .redact import RedactedError

EXIT_OK, EXIT_FAILED, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 130

# A refusal is worded for the command line; raised out of the API (featurize.run, train, apply ...),
# the flags it names become the API's arguments of the same meaning (api.py: api_words).
API_WORDS = {
    "--set": "overrides",
    **{f"--{flag}": f"{flag.replace('-', '_')}=True" for flag in ("overwrite", "retry-failed", "incremental",
                                                                  "allow-other-source")},
    **{f"--{flag}": flag for flag in ("sweep", "column", "input", "output", "name", "address", "image", "video",
                                      "text", "id")},
}
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]*(?![\w-])")


def api_words(message: str) -> str:
    """`message` with the command's flags (API_WORDS) as the API's arguments: `run with --overwrite`
    -> `run with overwrite=True`."""
    return _FLAG.sub(lambda m: API_WORDS.get(m.group(0), m.group(0)), message)


def did_you_mean(name: Union[str, Sequence[str]], choices: Sequence[str]) -> str:
    """`; did you mean a, b?` with the choices closest to a mistyped name (up to three; for several
    names, the closest to each), or nothing when none is close."""
    names = [name] if isinstance(name, str) else list(name)
    near = [c for one in names for c in difflib.get_close_matches(one, choices, n=3 if len(names) == 1 else 1)]
    return f"; did you mean {', '.join(dict.fromkeys(near))}?" if near else ""


class Refused(RedactedError):
    """A command that cannot run as asked (a bad job file, an unreachable source, an unknown model,
    an output holding another job's ...). Nothing was written or lost; fix the cause and run again."""


# the output root, as every command that writes or reads one finds it (output/)
class OutputExists(Refused, RuntimeError):
    """The output root holds another job's output, or cannot be used as asked."""


class NoOutput(Refused, FileNotFoundError):
    """No featurize output where one was named (a typo'd path): `status` and `inspect` say so."""


class LeaseHeld(OutputExists):
    """Another run is writing into this output root."""


class TableError(Refused, ValueError):
    """A features table that cannot be trained on or applied to, as asked; names the problem."""


# the job file, the command line and every name that becomes part of a path (config, cli_args, names)
class ConfigError(Refused, ValueError):
    """A job file that cannot run; the message names the key."""


class BadOption(Refused):
    """A command-line value that cannot be used (not JSON, not an object); names the flag."""


class UnsafeName(Refused, ValueError):
    """A name that is not plain; says which key or column holds it."""


# plan: the source listed (extract/)
class SourceError(Refused, RuntimeError):
    """The source cannot be listed: unreachable, empty or malformed."""


# model: families, weights and temporal heads, resolved on the driver (models/)
class ModelError(Refused, ValueError):
    """An unknown family, architecture or layer; raised on the driver before any work."""


class WeightsError(Refused, RuntimeError):
    """Weights that cannot be found, fetched, verified or loaded."""


class TemporalError(Refused, ValueError):
    """A temporal entry that cannot run; the message names the key (`temporal[1].checkpoint`)."""


# training and apply (train/)
class TrainError(Refused, ValueError):
    """A training that cannot start as asked: names the key and the problem."""


class StateError(Refused, ValueError):
    """A per-epoch state that is not what a training of this project wrote; names the file."""


class CheckpointError(Refused, ValueError):
    """A checkpoint directory that cannot be loaded; names the file and the problem."""


class ApplyError(Refused, ValueError):
    """An apply that cannot run as asked (exit 2); one line naming the problem."""


class BadArgument(Refused, ValueError):
    """An argument of the API of the wrong type or value; names it."""


# the similarity index and its queries (index/)
class IndexRefused(TableError):
    """An index that cannot be built, opened or searched as asked; names the problem."""


class IndexDamaged(IndexRefused):
    """An index whose meta.json or files cannot be read back; `reason` says what is wrong. `shown`
    is the index's folder as the user may see it, OUT/_index/<column> (a column is a plain name)."""

    def __init__(self, shown: str, reason: str):
        self.reason = reason
        super().__init__(f"the index at {shown} is damaged ({reason}): run featurize index "
                         f"{shown.rsplit('/', 2)[0]} --rebuild")


class QueryError(Refused, ValueError):
    """A query that cannot be embedded in the table's feature space; the message says why."""


# reports and pages (pages/)
class ReportError(Refused, ValueError):
    """No output root at the URI, or one the report cannot read."""


# a job sent to a cluster (submit)
class SubmitError(Refused, RuntimeError):
    """The cluster could not be reached or refused the submission."""


# per-sample errors: each becomes its sample's error row, `stage/error_type` (rows.error_fields)
class SampleError(Exception):
    """A sample that failed. Its error row's `error_type` is the raiser's, else the class's, else the
    class's name; its `stage` (read, decode, model ...) the raiser's, else the class's where the
    class belongs to one stage, else the stage that caught it."""

    error_type = ""
    stage = ""

    def __init__(self, message: str = "", error_type: str = "", stage: str = ""):
        super().__init__(message)
        self.error_type = error_type or self.error_type or type(self).__name__
        self.stage = stage or self.stage


class ReadFailure(SampleError):
    """A sample whose bytes could not be read (extract/read.py, fetch.py, shards.py)."""

    stage = "read"


class DecodeFailure(SampleError):
    """A sample whose bytes could not be decoded (extract/decode.py, video.py, isolate.py)."""

    stage = "decode"


class EvalError(Refused, ValueError):
    """An evaluation that cannot run as asked (featurize eval, featurize.evaluate): names the problem."""
