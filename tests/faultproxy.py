"""A fault-injecting HTTP reverse proxy for tests, meant to sit in front of the moto S3 server.

    with FaultProxy(moto_endpoint, fault_rate=0.3, seed=1) as proxy:
        fs = s3fs.S3FileSystem(..., client_kwargs={"endpoint_url": proxy.endpoint})

A faulted request is read in full, then either dropped with a TCP reset (no response at all) or
answered with S3's 503 SlowDown. Everything else is forwarded verbatim, one fresh upstream
connection per request. `fault_rate` and `down` (every request gets 503: an outage) can be
changed while the proxy runs.
"""
from __future__ import annotations

import http.client
import io
import random
import socket
import struct
import threading
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>fault</RequestId></Error>"
)
# Hop-by-hop headers: they describe one connection, never forwarded as they are. `Expect` is
# handled here (BaseHTTPRequestHandler answers 100 Continue), so upstream must not see it.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
              "upgrade", "expect"}


class FaultProxy:
    def __init__(self, upstream: str, fault_rate: float = 0.0, seed: int = 0):
        url = urllib.parse.urlsplit(upstream)
        self.upstream = (url.hostname, url.port or 80)
        self.fault_rate = fault_rate
        self.down = False
        self.requests = self.faults = self.resets = self.slowdowns = 0
        self.kinds: Counter = Counter()  # requests by S3 operation (s3_operation), for counting tests and bench/commit.py
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server = None
        self._thread = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FaultProxy":
        proxy = self

        class Handler(_Handler):
            pass

        Handler.proxy = proxy
        # Port 0: a free one. ThreadingHTTPServer uses daemon threads, so stop() never waits on them.
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _decide(self, operation: str = "") -> str:
        """'reset', 'slowdown' or 'forward' for the next request; counts it."""
        with self._lock:  # one seeded RNG shared by all handler threads
            self.requests += 1
            self.kinds[operation] += 1
            if self.down:
                kind = "slowdown"
            elif self._rng.random() < self.fault_rate:
                kind = self._rng.choice(("reset", "slowdown"))
            else:
                return "forward"
            self.faults += 1
            if kind == "reset":
                self.resets += 1
            else:
                self.slowdowns += 1
            return kind


def s3_operation(method: str, path: str, headers) -> str:
    """The S3 operation a path-style request is, roughly: enough to count what a client does."""
    url = urllib.parse.urlsplit(path)
    query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
    key = url.path.strip("/").partition("/")[2]
    if method == "GET":
        return "ListObjectsV2" if not key or "list-type" in query or "prefix" in query else "GetObject"
    if method == "PUT":
        return "CopyObject" if headers.get("x-amz-copy-source") else "PutObject"
    if method == "POST" and "delete" in query:
        return "DeleteObjects"
    return {"HEAD": "HeadObject", "DELETE": "DeleteObject"}.get(method, method)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so the client's connection pool is exercised
    timeout = 60  # idle keep-alive connections end their thread eventually
    proxy: FaultProxy

    def log_message(self, *args) -> None:  # quiet
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = io.BytesIO()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    break
                body.write(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers, dropped
                pass
            return body.getvalue()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        # Always read the whole request first: the client has sent it before any fault shows.
        body = self._read_body()
        kind = self.proxy._decide(s3_operation(self.command, self.path, self.headers))
        if kind == "reset":
            self._reset()
        elif kind == "slowdown":
            self._respond(503, [("Content-Type", "application/xml")], SLOWDOWN_BODY)
        else:
            self._forward(body)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = _handle

    def _reset(self) -> None:
        # SO_LINGER (on, 0s): close() sends RST instead of FIN, so the client sees ECONNRESET.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The socket's fd is only released once rfile (a makefile) is closed too.
        self.rfile.close()
        self.wfile.close()
        self.connection.close()
        # The base class still flushes/closes these after we return; give it harmless stand-ins.
        self.rfile, self.wfile = io.BytesIO(), io.BytesIO()
        self.close_connection = True

    def _forward(self, body: bytes) -> None:
        headers = [(k, v) for k, v in self.headers.items()
                   if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"]
        if body or "Content-Length" in self.headers or self.command in ("PUT", "POST"):
            headers.append(("Content-Length", str(len(body))))  # chunked bodies go de-chunked
        conn = http.client.HTTPConnection(*self.proxy.upstream, timeout=60)
        try:
            # Host and Accept-Encoding come from the client's headers, unchanged.
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in headers:
                conn.putheader(k, v)
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()  # http.client de-chunks; HEAD has no body
            out = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
            if self.command != "HEAD" and resp.status not in (204, 304):
                out = [(k, v) for k, v in out if k.lower() != "content-length"]
                out.append(("Content-Length", str(len(data))))
            self._respond(resp.status, out, data, add_length=False, reason=resp.reason)
        except OSError as e:
            self._respond(502, [("Content-Type", "text/plain")], f"upstream failed: {e}".encode())
        finally:
            conn.close()

    def _respond(self, status, headers, body, add_length=True, reason=None) -> None:
        self.send_response_only(status, reason)  # no extra Server/Date: upstream sent its own
        for k, v in headers:
            self.send_header(k, v)
        if add_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
