"""The fixed cost of one small run on a warm embedded Ray: what each extraction and each training of
the test suite pays whatever its size, and what the Ray costs while idle.

    .venv/bin/python bench/run_cost.py --runs 4

Starts an embedded Ray as `featurize run` does, then runs the same small job (`--images` images,
random-init ResNet-18 on 56x56 crops, as the tests' jobs) `--runs` times into new outputs, then
trains a linear probe on its features `--runs` times, then leaves Ray idle for `--idle` seconds.
For each it prints the wall time, the machine's CPU seconds (/proc/stat: run it with nothing else
running) and the driver's own. The first of each is cold: Ray starts the worker processes that the
later ones reuse. (Per process kind: bench/cpu_by_process.py --by-kind on this script.)
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from contextlib import contextmanager

HZ = os.sysconf("SC_CLK_TCK")


def machine_cpu() -> float:
    """CPU seconds the whole machine has been busy (all but idle and iowait)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / HZ


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextmanager
def measured(label: str):
    t0, c0, d0 = time.time(), machine_cpu(), own_cpu()
    yield
    print(f"| {label} | {time.time() - t0:.1f} | {machine_cpu() - c0:.1f} | {own_cpu() - d0:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of an idle Ray measured at the end")
    args = parser.parse_args()

    from pipeline.config import parse_job
    from pipeline.extract.runner import run_job
    from pipeline.jobrun import init_ray
    from pipeline.samples import make_image_folder
    from pipeline.train.loop import train
    from pipeline.train.trainfile import parse_training

    work = tempfile.mkdtemp(prefix="run-cost-")
    make_image_folder(f"{work}/src", n=args.images, broken=0)

    def job(i: int):
        return parse_job({"name": "cost", "source": {"uri": f"{work}/src", "split": "train"},
                          "output": {"uri": f"{work}/out{i}", "file_size": "8KiB"},
                          "model": {"arch": "resnet18", "weights": "none"}, "preprocess": {"resize": 64, "crop": 56},
                          "resources": {"batch_size": 16, "decode_batch_size": 8}})

    def training(i: int):
        return parse_training({"name": f"cost{i}", "data": {"uri": f"{work}/out0", "val_fraction": 0.2},
                               "head": {"kind": "linear"}, "train": {"epochs": 3, "batch_size": 8},
                               "output": {"uri": f"{work}/head{i}"}})

    print("| run | wall s | machine CPU-s | driver CPU-s |\n|---|---|---|---|")
    with measured("embedded Ray start"):
        init_ray(None)
    for i in range(args.runs):
        with measured(f"extraction {i + 1} ({args.images} images)"):
            run_job(job(i))
    for i in range(args.runs):
        with measured(f"training {i + 1} (linear probe, 3 epochs)"):
            train(training(i), say=lambda line: None)
    time.sleep(5)  # the last run's actors exit
    with measured(f"idle Ray, {args.idle:.0f} s"):
        time.sleep(args.idle)


if __name__ == "__main__":
    main()
