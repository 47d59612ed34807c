"""The progress a run shows (pipeline/progress.py) and the quiet console (pipeline/console.py).

The lines are formatted without Ray; two runs of the command, each in its own process joining the
session's Ray with --address, show the line in a pseudo-terminal and in a pipe, and Ray's noise stays
off the terminal (test_interrupt checks the same of a run that starts a Ray of its own)."""
from __future__ import annotations

import logging
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import yaml
from fsspec.implementations.local import LocalFileSystem

from pipeline.console import NATIVE_NOISE, NOISE, RayNoise
from pipeline.output.ledger import Ledger, Staged, Tally, parquet_bytes, part_name, write_atomic
from pipeline.progress import (
    Counts,
    Nouns,
    Rate,
    bar_format,
    clock,
    describe_job,
    nouns_of,
    plain_line,
    postfix,
    starting,
)
from pipeline.samples import make_image_folder

from conftest import RAY_NOISE, SMALL_MODEL, job_dict

FEATURIZE = Path(sys.executable).with_name("featurize")


# ---------------------------------------------------------------- the lines, without Ray

def test_the_plain_line_counts_rate_eta_and_bound():
    c = Counts(done=68, planned=150, before=0, rows=68, errors=2, elapsed=10.0, bound="model")
    assert plain_line(c, Nouns()) == ("progress     68/150 samples (45%), 2 errors, 6.8 samples/s, ETA 0:12, "
                                      "bound: model")
    # a resumed run starts from what earlier runs committed; its rate and ETA are its own
    c = Counts(done=110, planned=150, before=100, rows=10, errors=1, elapsed=10.0)
    assert plain_line(c, Nouns()) == "progress     110/150 samples (73%), 1 error, 1.0 samples/s, ETA 0:40"
    # nothing committed yet: no rate, no ETA
    assert plain_line(Counts(0, 9, 0, 0, 0, 3.0), Nouns()).endswith("0.0 samples/s, ETA ?")


def test_videos_cut_in_windows_count_videos_and_their_clips():
    c = Counts(done=12, planned=40, before=0, rows=130, errors=0, elapsed=6.0)
    nouns = Nouns("videos", "clips")
    assert plain_line(c, nouns).startswith("progress     12/40 videos (30%), 130 clips, 0 errors, 2.0 videos/s")
    video = SimpleNamespace(is_video=True, video=SimpleNamespace(window_s=2.0), source=SimpleNamespace(format="folder"))
    assert nouns_of(video) == nouns
    shards = SimpleNamespace(is_video=False, video=SimpleNamespace(window_s=None),
                             source=SimpleNamespace(format="webdataset"))
    assert nouns_of(shards) == Nouns("shards", "samples")
    images = SimpleNamespace(is_video=False, video=SimpleNamespace(window_s=None), source=SimpleNamespace(format="x"))
    assert nouns_of(images) == Nouns("samples", None)


def test_the_terminal_line_is_tqdms_with_the_same_details():
    from tqdm import tqdm

    c = Counts(done=68, planned=150, before=0, rows=68, errors=2, elapsed=10.0, bound="decode")
    line = tqdm.format_meter(68, 150, 10.0, ncols=110, prefix="featurize", unit=" samples",
                             bar_format=bar_format(Nouns()), postfix=postfix(c, Nouns()))
    assert line.startswith("featurize  45%|") and line.endswith("| 68/150 samples, 2 errors, bound: decode "
                                                                "[0:10<0:12, 6.80 samples/s]")


def test_the_rate_is_a_moving_average_that_does_not_jump_after_the_first_commit():
    """Start-up 30 s, then a file of 256 rows every 10 s (25.6 rows/s): tqdm's smoothed rate read
    38.7 samples/s right after a first commit, then 0.8; this one rises towards the steady rate."""
    rate, rates = Rate(0.0, 0), []
    done = 0
    for t in range(1, 301):
        if t >= 30 and t % 10 == 0:
            done += 256
        rates.append(rate.add(float(t), done))
    assert rates[28] == 0.0 and rates[29] == pytest.approx(256 / 30)  # the first commit: its rows over 30 s
    after = [r for r in rates[29:]]
    assert max(after) / min(after) < 4  # no jump from one poll to the next, as commits come and go
    assert max(b / a for a, b in zip(after, after[1:])) < 2  # a commit at most doubles it (tqdm: x40)
    assert rates[-1] == pytest.approx(25.6, rel=0.2)  # a minute after, the steady rate
    assert len(rate.points) <= 62  # a minute of polls kept, however long the run
    # a resumed run's rate is its own: rows committed earlier are not in it
    resumed = Rate(0.0, 500)
    assert resumed.add(10.0, 520) == pytest.approx(2.0)
    assert Counts(520, 600, 500, 20, 0, 10.0, recent=2.0).eta == pytest.approx(40.0)


def test_a_line_says_what_is_starting_before_progress_can(capsys):
    job = SimpleNamespace(name="demo", model=SimpleNamespace(arch="resnet18"),
                          source=SimpleNamespace(uri="s3://user:pw@bucket/images?X-Amz-Signature=abc"),
                          output=SimpleNamespace(uri="out/demo"))
    starting(True, describe_job(job))
    starting(False, "nothing: progress is off")
    err = capsys.readouterr().err
    assert err == "starting     job demo: resnet18 over s3://user:***@bucket/images?X-Amz-Signature=*** into out/demo\n"


def test_clock():
    assert [clock(s) for s in (None, 0, 9.4, 724, 10965)] == ["?", "0:00", "0:09", "12:04", "3:02:45"]


def stage(root, folder, ids, units=()):
    rel = f"{folder}/{part_name(ids)}"
    path = f"{root}/_staging/job/run/task/{rel}"
    columns = {"sample_id": list(ids)}
    if folder == "errors":
        columns.update(stage=["decode"] * len(ids), error_type=["Broken"] * len(ids))
    import pyarrow as pa

    write_atomic(LocalFileSystem(), path, parquet_bytes(pa.table(columns)))
    kinds = ["decode/Broken"] * len(ids) if folder == "errors" else []
    return Staged(path, rel, list(ids), kinds, list(units))


def test_the_committer_counts_plan_rows_done_once(tmp_path):
    """A file is done with its row; a video cut in windows (or a tar shard) when all its rows are;
    rows Ray computed twice count once."""
    root = str(tmp_path)
    ledger, tally = Ledger(LocalFileSystem(), root, job="job"), Tally()
    windows = [("v.mp4#w0", "v.mp4", 2), ("v.mp4#w1", "v.mp4", 2)]
    tally.add(ledger.commit([stage(root, "features", ["a.jpg", "v.mp4#w0"], windows[:1])]), {"model": 1.5})
    assert (tally.units, tally.rows) == (1, 2)  # a.jpg; v.mp4 has one of its two windows
    tally.add(ledger.commit([stage(root, "features", ["v.mp4#w1"], windows[1:]),
                             stage(root, "errors", ["b.jpg"])]), {"model": 0.5, "write": 0.1})
    assert (tally.units, tally.features, tally.errors) == (3, 3, 1)
    tally.add(ledger.commit([stage(root, "features", ["a.jpg"])]), {})  # computed twice: dropped
    assert (tally.units, tally.rows, tally.seconds) == (3, 4, {"model": 2.0, "write": 0.1})


def test_ray_noise_is_filtered_from_the_console_only():
    record = logging.LogRecord("ray", logging.WARNING, "x.py", 1, NOISE[0] + ". Set RAY_AUTH_MODE=disabled", (), None)
    assert not RayNoise().filter(record)
    keep = logging.LogRecord("ray.data", logging.WARNING, "x.py", 1, "a task failed: %s", ("boom",), None)
    assert RayNoise().filter(keep)


def test_raylet_startup_notice_is_dropped_and_other_raylet_messages_print(capsys):
    from ray._private import worker

    from pipeline.console import quiet_ray

    message = {"pid": "raylet", "is_err": False, "lines": [
        "WARNING: 12 PYTHON worker processes have been started on node: abc with address: 127.0.0.1. "
        "This could be a result of using a large number of actors, or due to tasks blocked in ray.get() calls",
        "Task was killed due to the node running low on memory."]}
    try:
        quiet_ray(True)
        quiet_ray(True)  # idempotent: one wrapper, not two
        worker.print_to_stdstream(dict(message), ignore_prefix=False)
        shown = capsys.readouterr().out
        assert "running low on memory" in shown and "worker processes have been started" not in shown
        quiet_ray(False)  # --verbose: Ray prints everything again
        worker.print_to_stdstream(dict(message), ignore_prefix=False)
        assert "worker processes have been started" in capsys.readouterr().out
    finally:
        quiet_ray(True)


def test_native_stderr_lines_are_filtered_and_python_stderr_is_untouched():
    code = ("import os, sys\nfrom pipeline.console import NativeStderr\nwith NativeStderr():\n"
            f"    os.write(2, b'[core_worker.cc] Actor ' + {NATIVE_NOISE[0]!r} + b' see #53727\\n')\n"
            "    os.write(2, b'a native line kept\\n')\n    print('a python line', file=sys.stderr)\n"
            "print('after', file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "a native line kept" in result.stderr and "a python line" in result.stderr and "after" in result.stderr
    assert "constructor arguments" not in result.stderr


# ---------------------------------------------------------------- the command, as a user runs it

def featurize_command():
    return [str(FEATURIZE)] if FEATURIZE.exists() else [sys.executable, "-m", "pipeline.cli"]


def in_terminal(args, env, timeout=240):
    """Run a command with stderr on a pseudo-terminal: (exit code, what the terminal got, stdout)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdin=slave, stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    seen, deadline = b"", time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the process closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    out = proc.stdout.read().decode()
    return proc.wait(timeout=30), seen.decode(errors="replace"), out


@pytest.fixture
def job_file(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_image_folder(str(src), n=8, broken=1)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job_dict(str(src), str(out), name="progress")))
    return path, out


def env_for(ray_tmpdir, **extra):  # ray_tmpdir: conftest's fixture
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmpdir), **extra}
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_the_command_shows_progress_in_a_terminal_and_in_a_pipe_and_no_ray_noise(job_file, ray_tmpdir, ray_address):
    job, out = job_file
    # both runs join the session's Ray (no Ray start of their own, 10-30 s each on 2 cores)
    code, terminal, stdout = in_terminal([*featurize_command(), "run", str(job), "--address", ray_address],
                                         env_for(ray_tmpdir))
    assert code == 0, terminal[-3000:]
    assert "\r" in terminal and "featurize 100%|" in terminal  # one line, redrawn in place
    assert "9/9 samples, 1 error" in terminal and "samples/s]" in terminal
    assert not [n for n in RAY_NOISE if n in terminal], terminal
    assert "samples      9 (8 features, 1 errors)" in stdout and "ray logs     " in stdout  # the summary on stdout

    # lose a committed file, as if the run had stopped before it: the next run resumes, counting
    # from what is still committed, with plain lines in a pipe
    lost = sorted((out / "features").rglob("*.parquet"))[0]
    kept = 9 - pq.read_metadata(lost).num_rows
    lost.unlink()
    result = subprocess.run([*featurize_command(), "run", str(job), "--address", ray_address], capture_output=True,
                            text=True, timeout=240,
                            env=env_for(ray_tmpdir, FEATURIZE_PROGRESS_INTERVAL="0.3"))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    # what is starting, at once (the imports, the listing and Ray's start come before any progress)
    assert lines[:2] == [f"starting     job progress: {SMALL_MODEL['arch']} over {out.parent / 'src'} into {out}",
                         f"starting     {9 - kept} samples to do ({kept} committed earlier): Ray and the model's actors"]
    lines = lines[2:]
    assert lines and all(line.startswith("progress     ") for line in lines), result.stderr
    assert lines[0].startswith(f"progress     {kept}/9 samples")
    assert lines[-1].startswith("progress     9/9 samples (100%)")
    assert "\r" not in result.stderr
    assert f"skipped      {kept} planned samples already committed" in result.stdout


def test_quiet_turns_progress_off_and_verbose_turns_ray_on(job_file, capsys, monkeypatch):
    """The flags as run_job gets them (a run itself is above; without Ray here)."""
    import contextlib

    import pipeline.extract.runner
    from pipeline.cli import main
    from pipeline.output.record import Summary
    from pipeline.progress import watch

    job, out = job_file
    seen = []

    def run_job(job, **kwargs):
        seen.append({k: kwargs[k] for k in ("progress", "verbose")})
        return Summary(str(out), planned=9, features=8, errors={"decode/DecodeError": 1}, wall_s=1.0, startup_s=1.0)

    monkeypatch.setattr(pipeline.extract.runner, "run_job", run_job)
    for flags in ([], ["--quiet"], ["-q"], ["--verbose"], ["--progress"]):
        assert main(["run", str(job), *flags]) == 0
    assert seen == [{"progress": True, "verbose": False}, {"progress": False, "verbose": False},
                    {"progress": False, "verbose": False}, {"progress": True, "verbose": True},
                    {"progress": True, "verbose": True}]  # --progress: the old flag, now --verbose
    printed = capsys.readouterr()
    assert printed.out.count("samples      9 (8 features, 1 errors)") == 5  # the summary, quiet or not
    assert isinstance(watch(None, 9, 0, Nouns(), enabled=False), contextlib.nullcontext)  # no thread, no line
    with pytest.raises(SystemExit):
        main(["run", str(job), "--quiet", "--verbose"])
