"""s3fs through FaultProxy in front of the moto server: retries absorb faults, an outage fails fast."""
from __future__ import annotations

import os
import time
import uuid

import pytest

from conftest import s3_options
from faultproxy import FaultProxy


def proxied_fs(proxy: FaultProxy):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    options = s3_options(proxy.endpoint)
    # Bounded botocore retries; s3fs adds its own (5 tries, small backoff) on top.
    options["config_kwargs"] = {"retries": {"max_attempts": 3, "mode": "standard"}}
    return s3fs.S3FileSystem(skip_instance_cache=True, **options)


@pytest.fixture
def proxy(s3_server):
    with FaultProxy(s3_server, seed=1234) as p:
        yield p


def bucket() -> str:
    return f"faultproxy-{uuid.uuid4().hex[:8]}"


def test_clean_passthrough_large_object(proxy):
    fs = proxied_fs(proxy)
    b = bucket()
    fs.mkdir(b)
    data = os.urandom(2 * 1024 * 1024)
    fs.pipe(f"{b}/big.bin", data)
    assert fs.info(f"{b}/big.bin")["size"] == len(data)
    assert fs.cat(f"{b}/big.bin") == data
    assert fs.cat_file(f"{b}/big.bin", start=1000, end=3000) == data[1000:3000]
    fs.rm(f"{b}/big.bin")
    assert not fs.exists(f"{b}/big.bin")
    assert proxy.requests > 0 and proxy.faults == 0


def test_faults_are_absorbed_by_retries(proxy):
    fs = proxied_fs(proxy)
    b = bucket()
    proxy.fault_rate = 0.3
    fs.mkdir(b)
    # 20 objects: some 65 requests, of which ~20 faulted, each waited out by a client backoff
    objects = {f"{b}/obj/{i:03d}.txt": f"payload {i} ".encode() * (i + 1) for i in range(20)}
    fs.pipe(objects)
    fs.invalidate_cache()
    assert sorted(fs.find(f"{b}/obj")) == sorted(objects)
    assert fs.cat(sorted(objects)) == objects
    # The faults really happened, of both kinds.
    assert proxy.faults > 0 and proxy.resets > 0 and proxy.slowdowns > 0
    assert proxy.faults == proxy.resets + proxy.slowdowns < proxy.requests


def test_outage_fails_within_bounded_time(proxy):
    fs = proxied_fs(proxy)
    b = bucket()
    fs.mkdir(b)
    fs.pipe(f"{b}/key", b"value")
    proxy.down = True
    before = proxy.requests
    start = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017 - whichever error the client gives for a dead endpoint
        fs.cat_file(f"{b}/key")
    elapsed = time.monotonic() - start
    assert elapsed < 60, elapsed
    assert proxy.requests - before > 1  # it did retry, against a permanent 503
    proxy.down = False
    assert fs.cat_file(f"{b}/key") == b"value"  # and recovers once the outage ends
