"""Where the CPU goes, per process: run a command and sample its whole process tree from /proc.

    .venv/bin/python bench/cpu_by_process.py .venv/bin/featurize run jobs/demo.yaml \\
        --set source.uri=bench/out/jpegs-6000 --set output.uri=/tmp/cpu-out --overwrite

Prints each process's CPU seconds over the whole run and its nice value, then the cores each used
in a steady window (from 45% to 85% of the run, after start-up): an embedded Ray's raylet, GCS,
agents, Ray Data's helper actors, the driver, the model actor and the task workers all descend
from the driver, so all of them are seen.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Dict, Optional, Tuple

from peers import descendants  # bench/ is this script's folder, first on sys.path

HZ = os.sysconf("SC_CLK_TCK")


def sample(pid: int) -> Optional[Tuple[float, int, str]]:
    """(CPU seconds, nice, name)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline") as f:
            name = f.read().replace("\0", " ").strip()[:80]
        return (int(fields[11]) + int(fields[12])) / HZ, int(fields[16]), name
    except OSError:
        return None


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    proc = subprocess.Popen(sys.argv[1:])
    seen: Dict[int, Tuple[float, int, str]] = {}
    history = []
    t0 = time.time()
    while proc.poll() is None:
        for pid in descendants(proc.pid):
            s = sample(pid)
            if s:
                seen[pid] = s
        history.append((time.time(), {pid: s[0] for pid, s in seen.items()}))
        time.sleep(0.5)
    wall = time.time() - t0
    print(f"\nwall {wall:.1f} s, CPU {sum(s[0] for s in seen.values()):.1f} s over {len(seen)} processes")
    for _pid, (cpu, nice, name) in sorted(seen.items(), key=lambda kv: -kv[1][0])[:20]:
        print(f"{cpu:7.1f} s  nice {nice:3d}  {name}")
    if len(history) < 10:
        return
    (ta, a), (tb, b) = history[int(len(history) * 0.45)], history[int(len(history) * 0.85)]
    cores = sorted((((b[pid] - a.get(pid, 0.0)) / (tb - ta), pid) for pid in b), reverse=True)
    print(f"\ncores used from {ta - t0:.0f} s to {tb - t0:.0f} s: {sum(c for c, _ in cores):.2f} in all")
    for c, pid in cores[:12]:
        print(f"{c:6.2f}  nice {seen[pid][1]:3d}  {seen[pid][2]}")


if __name__ == "__main__":
    main()
