"""`featurize submit`: send a job to a Ray cluster through Ray's Jobs API.

The job file (with its `--set` overrides applied, so the cluster runs exactly what was checked
here) and this project's `pipeline` package travel in the job's runtime environment; the cluster's
nodes need only the dependencies (`pip install featurize`, or an image built from pyproject.toml).
The driver then runs on the head as `python -m pipeline.cli run job.yaml --address auto`.
"""
from __future__ import annotations

import asyncio
import copy
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, TextIO
from urllib.parse import urlparse

import yaml

from .config import JobConfig, apply_override
from .errors import SubmitError

JOB_FILE = "job.yaml"
PACKAGE = Path(__file__).resolve().parent
# Keys whose values are local paths when they are not URIs; made absolute before submission.
PATH_KEYS = (("source", "uri"), ("output", "uri"), ("model", "weights"), ("data", "uri"))  # data: training files


def shipped_job(data: Dict[str, Any], overrides: List[str], base: str) -> Dict[str, Any]:
    """The job as the cluster gets it: overrides applied, relative local paths made absolute.

    A relative path means "from where I ran the command"; on the head it would mean the job's
    unpacked working directory instead. Absolute paths are right for a cluster on this machine
    or on a shared filesystem; a remote cluster needs URIs (s3://...) its nodes can reach.
    """
    data = copy.deepcopy(data)
    for item in overrides:
        apply_override(data, item)
    for section, key in PATH_KEYS:
        node = data.get(section)
        if isinstance(node, dict) and _relative_local(node.get(key), base, must_exist=key == "weights"):
            node[key] = os.path.join(base, node[key])
    for entry in data.get("temporal") or []:
        if isinstance(entry, dict) and _relative_local(entry.get("checkpoint"), base, must_exist=False):
            entry["checkpoint"] = os.path.join(base, entry["checkpoint"])
    split_files = (data.get("source") or {}).get("split_files") or {}
    for split, path in split_files.items():
        if _relative_local(path, base, must_exist=False):
            split_files[split] = os.path.join(base, path)
    return data


def _relative_local(value: Any, base: str, must_exist: bool) -> bool:
    if not isinstance(value, str) or not value or "://" in value or os.path.isabs(value):
        return False
    # model.weights may be a torchvision weights name (IMAGENET1K_V2, none): only an existing file is a path
    return not must_exist or os.path.exists(os.path.join(base, value))


def local_paths(job) -> List[str]:
    """The job's (or training file's) paths that name this machine's disk (a remote cluster cannot see them)."""
    if not isinstance(job, JobConfig):  # a training file
        return [p for p in (job.data.uri, job.output.uri) if "://" not in p or p.startswith("file://")]
    paths = [job.source.uri, job.output.uri]
    if os.path.isabs(job.model.weights):
        paths.append(job.model.weights)
    paths += [t.checkpoint for t in job.temporal if t.checkpoint]
    return [p for p in paths if "://" not in p or p.startswith("file://")]


def is_loopback(address: str) -> bool:
    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


def submit(job, data: Dict[str, Any], address: str, wait: bool, out: Optional[TextIO] = None,
           overwrite: bool = False) -> int:
    """Submit the job or training (`data`: the file's mapping, overrides applied); with `wait`, follow
    it to the end and return its exit code, else return 0 once the cluster has accepted it. `out`:
    sys.stdout as it is at the call (a default bound at import kept a stream since replaced).
    `overwrite`: the command on the cluster runs with --overwrite."""
    out = out or sys.stdout
    from ray.job_submission import JobSubmissionClient

    if not is_loopback(address) and local_paths(job):
        print(f"featurize: warning: {', '.join(local_paths(job))} are local paths: every node of the cluster "
              f"at {address} must see them (a shared filesystem), else use s3:// or another object store",
              file=sys.stderr)
    try:
        client = JobSubmissionClient(address)
    except Exception as e:  # ConnectionError, or an authentication failure
        raise SubmitError(f"cannot reach the Ray Jobs API at {address}: {_reason(e)}") from None
    with tempfile.TemporaryDirectory(prefix="featurize-submit-") as folder:
        Path(folder, JOB_FILE).write_text(yaml.safe_dump(data, sort_keys=False))
        submission_id = client.submit_job(
            entrypoint=(f"python -m pipeline.cli {'run' if isinstance(job, JobConfig) else 'train'} {JOB_FILE} "
                        f"--address auto{' --overwrite' if overwrite else ''}"),
            runtime_env={"working_dir": folder, "py_modules": [str(PACKAGE)],
                         "excludes": ["__pycache__", "*.pyc"]},
            submission_id=f"featurize-{_slug(job.name)}-{uuid.uuid4().hex[:8]}",
            metadata={"featurize.job": job.name, "featurize.output": job.output.uri},
        )
    print(f"submitted   {submission_id} to {address}\n"
          f"output      {job.output.uri}\n"
          f"dashboard   {address.rstrip('/')}/#/jobs/{submission_id}\n"
          f"logs        ray job logs --follow --address {address} {submission_id}\n"
          f"stop        ray job stop --address {address} {submission_id}", file=out)
    if not wait:
        return 0
    return follow(client, submission_id, out)


def follow(client, submission_id: str, out: Optional[TextIO] = None) -> int:
    """Stream the job's logs until it ends; its exit code (0 when it succeeded)."""
    from ray.job_submission import JobStatus

    out = out or sys.stdout

    async def tail():
        async for lines in client.tail_job_logs(submission_id):
            out.write(lines)
            out.flush()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(f"\nfeaturize: stopped following; the job goes on: ray job stop {submission_id} stops it",
              file=sys.stderr)
        return 130
    info = client.get_job_info(submission_id)
    if info.status == JobStatus.SUCCEEDED:
        return 0
    reason = (info.message or "").strip().splitlines()
    print(f"featurize: job {submission_id} {info.status.value.lower()}"
          f"{': ' + reason[-1] if reason else ''}", file=sys.stderr)
    return info.driver_exit_code or 1


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:40]


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
