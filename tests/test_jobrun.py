"""The end of a run and of an apply (jobrun), written once: checked here without Ray."""
from types import SimpleNamespace

import pytest

from pipeline.jobrun import IncompleteOutput, NotExactlyOnce, failure_lines, run_to_end


def test_a_job_stopped_midway_is_recorded_interrupted_or_failed_and_goes_on_up():
    records = []

    def write():
        raise KeyboardInterrupt  # Ctrl-C (or SIGTERM, pipeline/interrupt.py) in the middle of the Ray Data job

    with pytest.raises(KeyboardInterrupt):  # committer None: stopping it fails, with a warning only
        run_to_end(SimpleNamespace(uri="out"), None, None, write, lambda **kw: records.append(kw), t0=5.0)
    with pytest.raises(OSError):
        run_to_end(SimpleNamespace(uri="out"), None, None, lambda: open("/no/such/file"),
                   lambda **kw: records.append(kw), t0=6.0)
    assert records[0] == {"status": "interrupted", "started_at": 5.0, "error": "KeyboardInterrupt: "}
    assert records[1]["status"] == "failed" and records[1]["error"].startswith("FileNotFoundError: ")

    def unrecordable(**kw):
        raise OSError("the store is gone")

    with pytest.raises(RuntimeError, match="boom"):  # the job's own error, not the record's
        run_to_end(SimpleNamespace(uri="out"), None, None, lambda: (_ for _ in ()).throw(RuntimeError("boom")),
                   unrecordable, t0=5.0)


def test_what_a_failed_run_or_apply_says():
    lines = failure_lines("apply", IncompleteOutput("3 planned samples ...\nrun the same command again"))
    assert lines == ["featurize: apply failed: IncompleteOutput: run the same command again",
                     "featurize: what was committed is kept; run the same command again to resume"]
    # its own message says to rebuild with --overwrite: no resume hint
    assert failure_lines("job demo", NotExactlyOnce("twice: rebuild it with --overwrite")) == [
        "featurize: job demo failed: NotExactlyOnce: twice: rebuild it with --overwrite"]
    assert failure_lines("apply", ValueError())[0] == "featurize: apply failed: ValueError: "
