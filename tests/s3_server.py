"""A real S3 API for the tests: moto's server (HTTP on a loopback port, in its own process),
behind a small proxy that counts every request and injects faults.

    with S3Server() as s3:            # skips the test in one line without moto[server] and s3fs
        s3.make_bucket("caches")
        env = s3.env                  # endpoint and credentials for s3fs, for subprocesses too
        s3.faults(error_share=0.3)    # 30% of requests answered 503 SlowDown
        s3.faults(drop_share=0.2)     # 20% of connections closed without an answer
        s3.faults(delay_s=0.2)        # every answer 0.2 s late
        s3.requests                   # [(method, path, status)] as the server saw them

Clients reach the proxy, never moto directly, so what the proxy counts is every request a
client made. The proxy runs on a thread of the test process; the processes a test starts
(``torchrun``, a killed build, spawned DataLoader workers) talk to it over HTTP like any other
client.
"""

from __future__ import annotations

import http.client
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Proxy(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def log_message(self, *args):  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _handle(self):
        body = self._body()
        owner = self.server.owner
        fault = owner._draw(self.command, self.path)
        if fault == "drop":
            owner._log(self.command, self.path, "dropped")
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if owner.delay_s:
            time.sleep(owner.delay_s)
        if fault == "error":
            status = owner.error_status
            msg = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>"
                   + (b"SlowDown" if status == 503 else b"InternalError")
                   + b"</Code><Message>injected by the test proxy</Message></Error>")
            owner._log(self.command, self.path, status)
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(msg)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "content-length")}
        headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection("127.0.0.1", owner.moto_port, timeout=60)
        try:
            conn.request(self.command, self.path, body=body if body or self.command in ("PUT", "POST") else None,
                         headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        owner._log(self.command, self.path, resp.status)
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "content-length", "connection", "server", "date"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: S3Server


class S3Server:
    """moto's S3 server in a subprocess and the counting, fault-injecting proxy in front of it."""

    def __init__(self, seed: int = 0):
        pytest.importorskip("moto.server", reason='moto[server] is not installed: pip install "kdcache[s3]"')
        pytest.importorskip("s3fs", reason='s3fs is not installed: pip install "kdcache[s3]"')
        self.moto_port = _free_port()
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self.requests: list[tuple[str, str, object]] = []
        self.faults()

    # -- faults ------------------------------------------------------------------------------
    def faults(self, *, error_share: float = 0.0, error_status: int = 503, drop_share: float = 0.0,
               delay_s: float = 0.0, only: str | None = None, methods: tuple[str, ...] = ()) -> None:
        """Set the faults (all off by default): a share of requests answered ``error_status``,
        a share of connections dropped without an answer, every answer ``delay_s`` late. Only
        requests whose path contains ``only`` and (if given) whose method is in ``methods``
        get the error or the drop."""
        with self._lock:
            self.error_share, self.error_status, self.drop_share = error_share, error_status, drop_share
            self.delay_s, self.only, self.methods = delay_s, only, tuple(methods)

    def _draw(self, method: str, path: str) -> str | None:
        with self._lock:
            if self.only is not None and self.only not in path:
                return None
            if self.methods and method not in self.methods:
                return None
            x = self._rng.random()
            if x < self.drop_share:
                return "drop"
            if x < self.drop_share + self.error_share:
                return "error"
            return None

    def _log(self, method: str, path: str, status) -> None:
        with self._lock:
            self.requests.append((method, path, status))

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()

    # -- the server ----------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment that points s3fs (this process's and any child's) at the proxy."""
        return {"FSSPEC_S3_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def __enter__(self) -> S3Server:
        self._moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(self.moto_port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.moto_port}/moto-api/", timeout=2)
                break
            except OSError:
                if self._moto.poll() is not None or time.monotonic() > deadline:
                    self._moto.kill()
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.1)
        self._proxy = _ProxyServer(("127.0.0.1", 0), _Proxy)
        self._proxy.owner = self
        self.port = self._proxy.server_address[1]
        self._thread = threading.Thread(target=self._proxy.serve_forever, daemon=True)
        self._thread.start()
        self._saved_env = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        import fsspec

        fsspec.config.set_conf_env(fsspec.config.conf)  # fsspec read its FSSPEC_* settings at import
        self._clear_instances()
        return self

    def __exit__(self, *exc) -> None:
        self._proxy.shutdown()
        self._proxy.server_close()
        self._moto.terminate()
        try:
            self._moto.wait(10)
        except subprocess.TimeoutExpired:
            self._moto.kill()
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        import fsspec

        fsspec.config.conf.pop("s3", None)
        self._clear_instances()

    @staticmethod
    def _clear_instances() -> None:
        """Forget cached s3fs instances (they hold the endpoint they were made with)."""
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()

    def make_bucket(self, name: str) -> str:
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
        return f"s3://{name}"
