"""Credentials never appear in what featurize writes or prints (issue 12 case 12).

A unit table for the redaction itself, then one small job with a distinctive marker planted in
every place a credential can be given, whose output files, console output and Ray logs are
searched for it byte by byte.
"""
from __future__ import annotations

import pytest

from pipeline.redact import MASK, redact, redact_text

M = "SeKrEt-M4rker-7q"  # the planted credential


@pytest.mark.parametrize("text, kept", [
    (f"http://user:{M}@host:8080/w.safetensors", "http://user:***@host:8080/w.safetensors"),
    (f"https://{M}@github.com/org/repo.git", "https://***@github.com/org/repo.git"),
    (f"s3://bucket/a.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={M}%2F20240101&X-Amz-Signature={M}"
     f"&X-Amz-Security-Token={M}&X-Amz-Expires=3600",
     "s3://bucket/a.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***&X-Amz-Signature=***"
     "&X-Amz-Security-Token=***&X-Amz-Expires=3600"),
    (f"https://storage.googleapis.com/b/o?GoogleAccessId={M}&Expires=1&Signature={M}",
     "https://storage.googleapis.com/b/o?GoogleAccessId=***&Expires=1&Signature=***"),
    (f"https://acct.blob.core.windows.net/c/b.jpg?sv=2022&sig={M}&se=2030", "https://acct.blob.core.windows.net/c/b.jpg?sv=2022&sig=***&se=2030"),
    (f"http://h/x?X-Goog-Signature={M}&token={M}&api_key={M}&page=2", "http://h/x?X-Goog-Signature=***&token=***&api_key=***&page=2"),
    (f"cannot read 'http://u:{M}@127.0.0.1:9/a.jpg' (ClientResponseError: 401)",
     "cannot read 'http://u:***@127.0.0.1:9/a.jpg' (ClientResponseError: 401)"),
    (f"headers={{'Authorization': 'Basic {M}', 'Cookie': 'sid={M}'}}", "headers={'Authorization': '***', 'Cookie': '***'}"),
    (f"Authorization: Bearer {M}", "Authorization: ***"),
    (f"http://user:p@ss{M}@host/a", "http://user:***@host/a"),  # an unencoded @ in the password
    ("/data/images/cat.jpg", "/data/images/cat.jpg"),  # nothing secret: unchanged
    ("http://host/a.jpg?width=10&page=3", "http://host/a.jpg?width=10&page=3"),
    ("email me at a@b.c", "email me at a@b.c"),
])
def test_redact_text(text, kept):
    assert redact_text(text) == kept
    assert M not in redact_text(text)


def test_redact_mappings_by_key_and_structure():
    options = {
        "key": M, "secret": M, "token": M, "anon": False, "endpoint_url": "http://127.0.0.1:9000", "region_name": "eu",
        "client_kwargs": {"endpoint_url": "http://x", "aws_session_token": M, "region_name": "eu"},
        "headers": {"Authorization": f"Basic {M}", "Cookie": M, "X-Custom": M},
        "password": M, "private_key_id": M, "sas_token": M, "credentials": {"client_email": M},
        "nested": [{"api_key": M}, f"http://u:{M}@h/"], "client": {"extra_headers": {"X-Token-Free-Name": M}},
        "connection_string": f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={M};EndpointSuffix=core",
        "gcs": {"token": {"type": "service_account", "private_key": M, "client_email": "a@b"}},
        "use_ssl": True, "requester_pays": True, "version_aware": False, "default_block_size": 1024,
    }
    out = redact(options)
    assert M not in repr(out)
    for harmless in ("anon", "endpoint_url", "region_name", "use_ssl", "requester_pays", "version_aware", "default_block_size"):
        assert out[harmless] == options[harmless]
    assert out["client_kwargs"]["endpoint_url"] == "http://x" and out["client_kwargs"]["region_name"] == "eu"
    assert out["headers"] == {"Authorization": MASK, "Cookie": MASK, "X-Custom": MASK}
    assert out["nested"] == [{"api_key": MASK}, "http://u:***@h/"]
    assert "AccountName=acct;AccountKey=***;" in out["connection_string"]
    # stable: another password gives the same redacted form (a rerun is the same job)
    assert redact({**options, "secret": "other", "headers": {"Authorization": "x", "Cookie": "y", "X-Custom": "z"}}) == out


def test_featurize_errors_mask_the_uris_they_quote():
    """Their messages reach the console, Ray's logs (a failed task's traceback) and _job.json."""
    import pickle

    from pipeline.errors import ConfigError, SourceError, TemporalError, WeightsError
    from pipeline.extract.read import StoreError

    for cls in (ConfigError, SourceError, WeightsError, TemporalError, StoreError):
        err = cls(f"cannot read http://u:{M}@h/x.jpg?sig={M} (401)")
        assert M not in str(err) and M not in repr(pickle.loads(pickle.dumps(err)))
        assert "http://u:***@h/x.jpg?sig=***" in str(err)


def test_featurize_log_records_mask_the_uris_they_quote(caplog):
    """The lease, the committer and the runner log output URIs and exceptions: no credentials."""
    import logging

    from pipeline.extract import runner
    from pipeline.output import lease
    from pipeline.output import ledger as commit

    with caplog.at_level(logging.WARNING):
        for module in (commit, lease, runner):
            module.log.warning("%s: could not renew the lease: %s", f"s3://b/out?X-Amz-Signature={M}",
                               OSError(f"GET https://u:{M}@h/o failed"))
    assert len(caplog.records) == 3
    assert all(M not in r.getMessage() and "X-Amz-Signature=***" in r.getMessage() for r in caplog.records)
    assert M not in caplog.text


# ---- one small job with the marker in every place a credential can be given ----

import base64  # noqa: E402
import contextlib  # noqa: E402
import http.server  # noqa: E402
import os  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

from conftest import S3_BUCKET, assert_exactly_once, job_dict, planned, read_features  # noqa: E402

USER = "featurize"


class _AuthHandler(http.server.SimpleHTTPRequestHandler):
    """Serves its folder to requests with HTTP basic auth USER:M only; records what it served."""

    def _allowed(self) -> bool:
        expected = "Basic " + base64.b64encode(f"{USER}:{M}".encode()).decode()
        if self.headers.get("Authorization") == expected:
            self.server.served.append(self.path)
            return True
        self.send_error(401, "authentication required")
        return False

    def do_GET(self):
        if self._allowed():
            super().do_GET()

    def do_HEAD(self):
        if self._allowed():
            super().do_HEAD()

    def log_message(self, *args):  # quiet
        pass


@contextlib.contextmanager
def auth_server(folder: Path):
    handler = lambda *a, **k: _AuthHandler(*a, directory=str(folder), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.served = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _files_holding(root: Path, needle: bytes):
    """Every file under root whose bytes contain needle (Parquet, JSON, logs alike)."""
    hits = []
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            with contextlib.suppress(OSError):
                if needle in path.read_bytes():
                    hits.append(str(path))
    return hits


def _ray_logs() -> Path:
    import ray

    return Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"


def _weights_file(folder: Path) -> Path:
    import torchvision
    from safetensors.torch import save_file

    path = folder / "w.safetensors"
    save_file({k: v.contiguous() for k, v in torchvision.models.resnet18().state_dict().items()}, str(path))
    return path


@pytest.mark.timeout(300)
def test_a_planted_credential_appears_nowhere(ray_session, s3, tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.samples import make_image_folder

    fs, options = s3
    src = tmp_path / "images"
    make_image_folder(str(src), n=6, broken=0)
    fs.put(str(src), f"{S3_BUCKET}/src", recursive=True)
    served = tmp_path / "served"
    served.mkdir()
    _weights_file(served)
    headers = {"Authorization": f"Bearer {M}", "Cookie": f"session={M}"}
    with auth_server(served) as server:
        weights = f"http://{USER}:{M}@127.0.0.1:{server.server_port}/w.safetensors"
        out = tmp_path / "out"
        job = job_dict(f"s3://{S3_BUCKET}/src", str(out),
                       source={"storage_options": {**options, "key": f"AKIA{M}", "secret": M, "token": M}},
                       output={"storage_options": {"key": M, "secret": M, "token": M, "password": M,
                                                   "headers": headers}})
        job["model"] = {"arch": "resnet18", "weights": weights}
        job_file = tmp_path / "job.yaml"
        job_file.write_text(yaml.safe_dump(job))

        assert main(["run", str(job_file)]) == 0
        assert "/w.safetensors" in server.served  # the credential was used, and worked
        assert main(["inspect", str(out)]) == 0
        assert main(["status", str(out)]) == 0
        missing = weights.replace("w.safetensors", "missing.safetensors")
        assert main(["run", str(job_file), "--set", f"model.weights={missing}"]) == 2  # a one-line error
    console = capsys.readouterr()
    assert_exactly_once(str(out), planned(src))
    assert f"http://{USER}:***@127.0.0.1" in (out / "_job.json").read_text()
    assert M not in console.out + console.err, (console.out + console.err)[-2000:]
    assert not _files_holding(out, M.encode())
    assert not _files_holding(_ray_logs(), M.encode())


def _manifest_source(served: Path, port: int, n: int = 3) -> list:
    """served/data: images img/0.jpg .. and a manifest naming them relative, presigned and with
    user-info, plus img/late.jpg, not there yet. Returns the manifest's uri column."""
    from pipeline.samples import encode, photo

    (served / "data" / "img").mkdir(parents=True)
    for i in range(n):
        (served / "data" / "img" / f"{i}.jpg").write_bytes(encode(photo(64, 48, seed=i)))
    here = f"127.0.0.1:{port}/data/img"
    uris = ["img/0.jpg", f"http://{USER}:{M}@{here}/1.jpg",
            f"http://{USER}:{M}@{here}/2.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={M}&X-Amz-Signature={M}",
            "img/late.jpg"]
    (served / "data" / "manifest.csv").write_text("uri,label\n" + "".join(f"{u},l{i % 2}\n" for i, u in enumerate(uris)))
    return uris


@pytest.mark.timeout(300)
def test_credentials_in_manifest_and_source_uris_appear_nowhere(ray_session, tmp_path, capsys):
    """User-info in source.uri (so in every row it leads to) and in manifest rows, and a presigned
    row: planned, read and written with the credentials masked; a resumed run (--retry-failed)
    still reads with the real ones, which OUT never held."""
    import json

    from pipeline.cli import main
    from pipeline.samples import encode, photo

    served = tmp_path / "served"
    with auth_server(served) as server:
        uris = _manifest_source(served, server.server_port)
        out = tmp_path / "out"
        job = job_dict(f"http://{USER}:{M}@127.0.0.1:{server.server_port}/data/manifest.csv", str(out),
                       source={"format": "manifest", "storage_options": {"headers": {"Cookie": f"session={M}"}}})
        job_file = tmp_path / "job.yaml"
        job_file.write_text(yaml.safe_dump(job))
        assert main(["run", str(job_file)]) == 0
        (served / "data" / "img" / "late.jpg").write_bytes(encode(photo(64, 48, seed=9)))
        assert main(["run", str(job_file), "--retry-failed"]) == 0  # OUT's plan is masked: listed again
        assert main(["inspect", str(out)]) == 0
    console = capsys.readouterr()
    from pipeline.redact import redact_text

    features = read_features(str(out), columns=["sample_id"])["sample_id"].to_pylist()
    assert not (out / "errors").exists()  # the 404 row was retried away; no empty folder is left to trip readers
    assert sorted(features) == sorted(redact_text(u) for u in uris)  # each once, read with the real credentials
    assert any(f"{USER}:***@" in s and "X-Amz-Signature=***" in s for s in features)
    assert "/data/img/late.jpg" in server.served
    assert json.loads((out / "_job.json").read_text())["status"] == "complete"
    assert M not in console.out + console.err, (console.out + console.err)[-2000:]
    assert not _files_holding(out, M.encode())
    assert not _files_holding(_ray_logs(), M.encode())
