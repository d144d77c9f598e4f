"""Run a real LMC server process on a free loopback port, and talk to it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HttpResult:
    def __init__(self, status: int, headers, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


class LmcServer:
    """`with LmcServer(args=[...], env={...}) as srv:` starts `python -m container serve` bound
    to 127.0.0.1 on a free port; always stops it (SIGTERM, then SIGKILL)."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, *,
                 wait_status: int | None = 200, timeout_s: float = 60.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = args
        self.env = {**os.environ, "LMC_LOG_LEVEL": "WARNING", **(env or {})}
        self.env.pop("SAGEMAKER_BIND_TO_PORT", None)
        self.wait_status = wait_status
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> LmcServer:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "container", "serve", "--host", "127.0.0.1",
             "--port", str(self.port), *self.args],
            cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        # Drained all along: a server that logs more than a pipe holds (64 KiB) would otherwise
        # block on its next log line, and a test would see a hang that is not the server's.
        self._log = bytearray()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        if self.wait_status is not None:
            self.wait_for_ping(self.wait_status, self.timeout_s)
        return self

    def wait_for_ping(self, status: int, timeout_s: float = 60.0) -> HttpResult:
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                last = self.request("GET", "/ping", timeout=2)
                if last.status == status:
                    return last
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"/ping never returned {status} (last: "
                           f"{last.status if last else None})")

    def request(self, method: str, path: str, body: bytes | dict | None = None,
                headers: dict | None = None, timeout: float = 30) -> HttpResult:
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        hdrs = {"Content-Type": "application/json"} if isinstance(body, (dict, list)) else {}
        hdrs.update(headers or {})
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return HttpResult(r.status, r.headers, r.read())
        except urllib.error.HTTPError as e:
            return HttpResult(e.code, e.headers, e.read())

    def post(self, path: str, body=None, **kw) -> HttpResult:
        return self.request("POST", path, body, **kw)

    def _drain(self) -> None:
        for chunk in iter(lambda: self.proc.stdout.read1(65536), b""):
            self._log += chunk

    def output(self) -> str:
        """What the server printed so far (all of it once it has exited)."""
        if self.proc and self.proc.poll() is not None:
            self._reader.join(5)
        return self._log.decode(errors="replace")

    def stop(self, timeout_s: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self.proc and self.proc.stdout:
            self._reader.join(5)
            self.proc.stdout.close()


def model_dir(tmp_path: Path, fixture: str, properties: str = "") -> Path:
    """Copy a fixture model dir under tmp_path and write its serving.properties."""
    import shutil

    dst = tmp_path / fixture
    shutil.copytree(FIXTURES / "server" / fixture, dst)
    if properties:
        (dst / "serving.properties").write_text(properties)
    return dst


class MotoServer:
    """`with MotoServer() as env:` runs moto's S3-compatible server on a free loopback port and
    gives the environment boto3 needs to reach it (also set in os.environ while it runs)."""

    def __init__(self, *, server_env: dict[str, str] | None = None) -> None:
        self.server_env = server_env or {}  # e.g. INITIAL_NO_AUTH_ACTION_COUNT=0: IAM checks on
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ENDPOINT_URL_S3": self.url, "AWS_ACCESS_KEY_ID": "test",
                    "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
        self.proc: subprocess.Popen | None = None
        self._saved: dict[str, str | None] = {}

    def __enter__(self) -> dict[str, str]:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, **self.server_env})
        self._saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=1).close()
                return self.env
            except urllib.error.HTTPError:  # it answers (e.g. 403 with IAM checks on): up
                return self.env
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.__exit__()
                    raise RuntimeError("the moto server did not start")
                time.sleep(0.2)

    def cpu_s(self) -> float:
        """CPU seconds the server process has used (user + system)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
