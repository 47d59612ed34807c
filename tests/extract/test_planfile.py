"""The driver's scratch folder: what a killed driver left is removed by the next run on the host."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from pipeline.extract import planfile


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_drivers_scratch_is_removed_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    mine = planfile.host_prefix()
    dead = tmp_path / f"{mine}{_dead_pid()}-abc"
    (dead / "read").mkdir(parents=True)
    (dead / "plan.parquet").write_bytes(b"s3://key:secret@bucket/a.jpg")
    kept = [tmp_path / f"{mine}{os.getpid()}-live",  # a run still going
            tmp_path / f"{planfile.SCRATCH_PREFIX}otherhost-{_dead_pid()}-x",  # a TMPDIR another host shares
            tmp_path / f"{planfile.SCRATCH_PREFIX}0a1b2c3d",  # an older release's name: no process to ask
            tmp_path / "unrelated"]
    for folder in kept:
        folder.mkdir()
    a_file = tmp_path / f"{mine}{_dead_pid()}-file"
    a_file.write_text("not a folder")

    with planfile.scratch() as folder:
        assert not dead.exists()
        assert all(k.exists() for k in kept)
        assert a_file.read_text() == "not a folder"
        assert os.path.basename(folder).startswith(f"{mine}{os.getpid()}-")
        assert planfile.remove_orphans() == []  # its own folder is a live run's
        assert os.path.isdir(folder)
    assert not os.path.exists(folder)
