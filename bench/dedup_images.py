"""Near-duplicate images: does `featurize dedup` find planted copies, and only those?

    .venv/bin/python bench/dedup_images.py [--originals 300] [--planted 60] [--threshold 0.95]
        [--set model.arch=resnet50 ...] [--dedup-arg=--center]

Generates `--originals` distinct photo-like JPEGs under bench/out/dedup-src/, and for the first
`--planted` of them three copies each: resized to half size, re-encoded at JPEG quality 25, and
cropped to the central 80%. Then, as a user would, `featurize run` extracts them (resnet18, random
init unless --set says otherwise: no weights can be downloaded here), `featurize dedup` groups them,
and the pairs it reports are scored against the planted ones: precision and recall over pairs, and
recall per kind of copy. Prints the times of both commands.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict

import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.samples import photo  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FEATURIZE = os.path.join(os.path.dirname(HERE), ".venv", "bin", "featurize")
COPIES = ("resized", "q25", "crop80")


def make_set(root: str, originals: int, planted: int) -> None:
    """root/<class>/o00012.jpg and, for planted originals, o00012_<copy>.jpg beside it."""
    shutil.rmtree(root, ignore_errors=True)
    for i in range(originals):
        folder = os.path.join(root, f"c{i % 5}")
        os.makedirs(folder, exist_ok=True)
        img = photo(400, 300, seed=10_000 + i)
        img.save(os.path.join(folder, f"o{i:05d}.jpg"), quality=90)
        if i < planted:
            img.resize((200, 150)).save(os.path.join(folder, f"o{i:05d}_resized.jpg"), quality=90)
            img.save(os.path.join(folder, f"o{i:05d}_q25.jpg"), quality=25)
            img.crop((40, 30, 360, 270)).save(os.path.join(folder, f"o{i:05d}_crop80.jpg"), quality=90)


def original(sample_id: str) -> str:
    return os.path.basename(sample_id).split("_")[0].split(".")[0]


def planted_pairs(ids) -> set:
    families = defaultdict(list)
    for sid in ids:
        families[original(sid)].append(sid)
    return {frozenset(p) for members in families.values() for p in itertools.combinations(sorted(members), 2)}


def found_pairs(groups_file: str) -> set:
    rows = pq.read_table(groups_file, columns=["group", "sample_id"]).to_pylist()
    groups = defaultdict(list)
    for row in rows:
        groups[row["group"]].append(row["sample_id"])
    return {frozenset(p) for members in groups.values() for p in itertools.combinations(sorted(members), 2)}


def timed(cmd: list) -> float:
    t = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.time() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--originals", type=int, default=300)
    parser.add_argument("--planted", type=int, default=60, help="originals that get three copies each")
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--dedup-arg", action="append", default=[], help="passed to featurize dedup")
    args = parser.parse_args()
    src, out = os.path.join(HERE, "out", "dedup-src"), os.path.join(HERE, "out", "dedup-out")
    make_set(src, args.originals, args.planted)
    job = os.path.join(HERE, "out", "dedup-job.yaml")
    with open(job, "w") as f:
        json.dump({"name": "dedup-bench", "source": {"uri": src}, "output": {"uri": out},
                   "model": {"arch": "resnet18", "weights": "none"}, "preprocess": {"resize": 160, "crop": 144}}, f)
    sets = [a for o in args.overrides for a in ("--set", o)]
    run_s = timed([FEATURIZE, "run", job, "--quiet", "--overwrite", *sets])
    groups = os.path.join(HERE, "out", "dedup-groups.parquet")
    dedup_s = timed([FEATURIZE, "dedup", out, "--threshold", str(args.threshold), "--out", groups, *args.dedup_arg])

    ids = pq.read_table(os.path.join(out, "features"), columns=["sample_id"]).column(0).to_pylist()
    truth, found = planted_pairs(ids), found_pairs(groups)
    hits = truth & found
    print(f"images          {len(ids)}: {args.originals} originals, {args.planted} of them with "
          f"{len(COPIES)} copies ({', '.join(COPIES)})")
    print(f"featurize run   {run_s:.1f} s   featurize dedup {dedup_s:.1f} s (threshold {args.threshold}"
          f"{', ' + ' '.join(args.dedup_arg) if args.dedup_arg else ''})")
    print(f"pairs           planted {len(truth)}, found {len(found)}, of them planted {len(hits)}")
    print(f"precision       {len(hits) / len(found) if found else float('nan'):.3f}")
    print(f"recall          {len(hits) / len(truth) if truth else float('nan'):.3f}")
    for copy in COPIES:  # each copy against its original
        want = {p for p in truth if any(s.endswith(f"_{copy}.jpg") for s in p)
                and any(original(s) + ".jpg" == os.path.basename(s) for s in p)}
        print(f"  recall {copy:<8} {len(want & found) / len(want) if want else float('nan'):.3f} (copy with original)")


if __name__ == "__main__":
    main()
