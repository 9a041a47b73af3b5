"""Real local mosquitto and influxd for tests, `make demo` and benchmarks.

Each instance runs on free loopback ports with its data and log in a folder of its own, and is stopped with it.
`restart()` keeps the ports, so a test can take the broker or the database away and bring it back.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Self


class ServiceUnavailable(RuntimeError):
    """A service cannot start; the message names what is missing and the fix."""


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """Runs in the child before exec: a killed test run or demo must not leave brokers and databases behind."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def find_binary(name: str, fallback: str, package: str) -> str:
    path = shutil.which(name) or (fallback if os.access(fallback, os.X_OK) else None)
    if path is None:
        raise ServiceUnavailable(
            f"{name} not found on PATH or at {fallback}: install it with `sudo apt-get install -y {package}` "
            "(make test does this when it runs as root)"
        )
    return path


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class _Service:
    name = "service"

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or find_free_port()
        self.host = "127.0.0.1"
        self.log_path = workdir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = 15.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = self._command()
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ServiceUnavailable(
                    f"{self.name} exited with {self._proc.returncode} during start-up:\n{_tail(self.log_path)}"
                )
            if self._ready():
                return
            time.sleep(0.05)
        self.stop()
        raise ServiceUnavailable(f"{self.name} did not answer within {timeout:g} s:\n{_tail(self.log_path)}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=5)

    def kill(self) -> None:
        """An unclean death (SIGKILL), for fault tests."""
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            self._proc.wait(timeout=5)
            self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def mqtt_handshake(host: str, port: int, timeout: float = 1.0) -> bool:
    """A real MQTT 3.1.1 CONNECT/CONNACK, not just an open port: the broker must be ready to serve clients."""
    client_id = b"infusion-probe"
    variable = b"\x00\x04MQTT\x04\x02\x00\x0a"  # protocol name, level 4, clean session, keepalive 10 s
    payload = len(client_id).to_bytes(2, "big") + client_id
    body = variable + payload
    packet = bytes([0x10, len(body)]) + body
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(packet)
            reply = s.recv(4)
            s.sendall(b"\xe0\x00")  # DISCONNECT
    except OSError:
        return False
    return reply[:2] == b"\x20\x02" and reply[3:4] == b"\x00"


class Mosquitto(_Service):
    name = "mosquitto"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _command(self) -> list[str]:
        binary = find_binary("mosquitto", "/usr/sbin/mosquitto", "mosquitto")
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} {self.host}\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "log_dest stdout\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            "max_queued_messages 100000\n"
        )
        return [binary, "-c", str(conf)]

    def _ready(self) -> bool:
        return mqtt_handshake(self.host, self.port)


class Influxd(_Service):
    """InfluxDB 1.x (Debian's 1.6.7): the v1 HTTP API, queried here with the standard library only."""

    name = "influxd"

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        super().__init__(workdir, port)
        self.rpc_port = find_free_port()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _command(self) -> list[str]:
        binary = find_binary("influxd", "/usr/bin/influxd", "influxdb")
        data = self.workdir / "data"
        conf = self.workdir / "influxdb.conf"
        conf.write_text(
            f"""reporting-disabled = true
bind-address = "{self.host}:{self.rpc_port}"
[meta]
  dir = "{data / "meta"}"
  logging-enabled = false
[data]
  dir = "{data / "data"}"
  wal-dir = "{data / "wal"}"
  wal-fsync-delay = "0s"
  query-log-enabled = false
[coordinator]
  log-queries-after = "0s"
[retention]
  enabled = false
[monitor]
  store-enabled = false
[http]
  enabled = true
  bind-address = "{self.host}:{self.port}"
  log-enabled = false
  flux-enabled = false
[logging]
  level = "warn"
[continuous_queries]
  enabled = false
[[graphite]]
  enabled = false
[[collectd]]
  enabled = false
[[opentsdb]]
  enabled = false
[[udp]]
  enabled = false
"""
        )
        return [binary, "-config", str(conf)]

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=1) as resp:
                return int(resp.status) == 204
        except (OSError, urllib.error.URLError):
            return False

    def _request(self, method: str, path: str, params: dict[str, str], data: bytes | None = None) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        req = urllib.request.Request(url, data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"influxd {path} answered {exc.code}: {exc.read().decode(errors='replace')}") from exc
        return json.loads(body) if body else None

    def create_database(self, name: str) -> None:
        self._request("POST", "/query", {"q": f'CREATE DATABASE "{name}"'})

    def write(self, db: str, lines: str) -> None:
        self._request("POST", "/write", {"db": db, "precision": "ns"}, lines.encode())

    def query(self, db: str, q: str) -> list[dict[str, Any]]:
        """The series of the first statement's result ([] when empty); an error in the result raises."""
        doc = self._request("GET", "/query", {"db": db, "q": q, "epoch": "ns"})
        result = doc["results"][0]
        if "error" in result:
            raise RuntimeError(f"influxd query {q!r} failed: {result['error']}")
        return list(result.get("series", []))
