"""Where the CPU goes, per process: run a command and sample its whole process tree from /proc.

    .venv/bin/python bench/cpu_by_process.py .venv/bin/featurize run jobs/demo.yaml \\
        --set source.uri=bench/out/jpegs-6000 --set output.uri=/tmp/cpu-out --overwrite

Prints each process's CPU seconds over the whole run and its nice value, then the cores each used
in a steady window (from 45% to 85% of the run, after start-up): an embedded Ray's raylet, GCS,
agents, Ray Data's helper actors, the driver, the model actor and the task workers all descend
from the driver, so all of them are seen.

With `--by-kind` first, it prints the CPU seconds summed over each kind of process instead (a Ray
actor's class, `ray::IDLE` for task workers, or the program), for a command that starts hundreds
of them, such as the test suite:

    .venv/bin/python bench/cpu_by_process.py --by-kind .venv/bin/pytest -q -p no:cacheprovider
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from typing import Dict, Optional, Tuple

from peers import descendants  # bench/ is this script's folder, first on sys.path

HZ = os.sysconf("SC_CLK_TCK")


def sample(pid: int) -> Optional[Tuple[float, int, str, str]]:
    """(CPU seconds, nice, name, start time)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline") as f:
            name = f.read().replace("\0", " ").strip()[:300]
        if not name:  # a zombie's is empty
            with open(f"/proc/{pid}/comm") as f:
                name = f.read().strip()
        return (int(fields[11]) + int(fields[12])) / HZ, int(fields[16]), name, fields[19]
    except OSError:
        return None


def kind(name: str) -> str:
    """ray::Committer.commit -> ray::Committer; python's script or module, or `python -c`; else the program."""
    if name.startswith("ray::"):
        return name.split()[0].split(".")[0]
    words = name.split()
    program = os.path.basename(words[0]) if words else "?"
    if program.startswith("python"):
        args = iter(words[1:])
        for word in args:
            if word in ("-m", "-c"):
                return "python -c" if word == "-c" else next(args, "?")
            if word in ("-X", "-W"):
                next(args, None)
            elif not word.startswith("-"):
                return os.path.basename(word)
    return program


def by_kind(seen: Dict[Tuple[int, str], Tuple[float, int, str]]) -> None:
    total: Counter = Counter()
    count: Counter = Counter()
    for cpu, _nice, name in seen.values():
        k = kind(name)
        total[k] += cpu
        count[k] += 1
    for k, cpu in total.most_common(30):
        print(f"{cpu:7.1f} s  {count[k]:4d} processes  {cpu / count[k]:5.2f} s each  {k}")


def main() -> None:
    grouped = sys.argv[1:2] == ["--by-kind"]
    command = sys.argv[2:] if grouped else sys.argv[1:]
    if not command:
        sys.exit(__doc__)
    proc = subprocess.Popen(command)
    # keyed by (pid, start time): over a long command the kernel gives a finished process's pid to another
    seen: Dict[Tuple[int, str], Tuple[float, int, str]] = {}
    history = []
    t0 = time.time()
    while proc.poll() is None:
        for pid in descendants(proc.pid):
            s = sample(pid)
            if s:
                seen[pid, s[3]] = s[:3]
        if not grouped:
            history.append((time.time(), {key: s[0] for key, s in seen.items()}))
        time.sleep(0.5)
    wall = time.time() - t0
    print(f"\nwall {wall:.1f} s, CPU {sum(s[0] for s in seen.values()):.1f} s over {len(seen)} processes")
    if grouped:
        by_kind(seen)
        return
    for _key, (cpu, nice, name) in sorted(seen.items(), key=lambda kv: -kv[1][0])[:20]:
        print(f"{cpu:7.1f} s  nice {nice:3d}  {name[:80]}")
    if len(history) < 10:
        return
    (ta, a), (tb, b) = history[int(len(history) * 0.45)], history[int(len(history) * 0.85)]
    cores = sorted((((b[key] - a.get(key, 0.0)) / (tb - ta), key) for key in b), reverse=True)
    print(f"\ncores used from {ta - t0:.0f} s to {tb - t0:.0f} s: {sum(c for c, _ in cores):.2f} in all")
    for c, key in cores[:12]:
        print(f"{c:6.2f}  nice {seen[key][1]:3d}  {seen[key][2][:80]}")


if __name__ == "__main__":
    main()
