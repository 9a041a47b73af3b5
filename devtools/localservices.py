"""Real local mosquitto and influxd for tests, `make demo` and benchmarks.

Each instance runs on free loopback ports with its config, data and log in a folder of its own, and is
stopped with it. `restart()` keeps the ports, so a test can take the broker or the database away and bring it
back at the address the gateway already knows.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

HOST = "127.0.0.1"
_LOG_TAIL_LINES = 20
_PR_SET_PDEATHSIG = 1


class ServiceUnavailable(RuntimeError):
    """A service cannot start; the message names what is missing and the fix, or ends with its log."""


class _PortTaken(ServiceUnavailable):
    """Another process bound our port between choosing it and starting; a fresh port may be tried."""


class InfluxError(RuntimeError):
    """influxd refused a request or reported an error in a query result."""


def find_free_port() -> int:
    """A TCP port on 127.0.0.1, free a moment ago; the kernel picks it, so parallel runs rarely clash."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def find_binary(name: str, fallback: str, package: str) -> str:
    """The executable's path; /usr/sbin is often not on a normal user's PATH, hence the fallback."""
    path = shutil.which(name) or (fallback if os.access(fallback, os.X_OK) else None)
    if path is None:
        raise ServiceUnavailable(
            f"{name} not found on PATH or in {os.path.dirname(fallback)}: "
            f"install it with `sudo apt-get install -y {package}` (`make services` does this as root)"
        )
    return path


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """prctl(2), resolved in the parent: loading a library between fork and exec can deadlock."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
        return prctl
    except (OSError, AttributeError):
        return None


def _die_with_parent() -> Callable[[], None] | None:
    """A pre-exec hook so a killed test run or demo does not leave brokers and databases behind.

    Linux sends the signal when the forking *thread* exits, so it is armed from the main thread only: a
    service started from a worker thread (asyncio.to_thread) would otherwise die when that worker goes away.
    """
    prctl = _prctl()
    if prctl is None or threading.current_thread() is not threading.main_thread():
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect: nobody would ever signal us
            os._exit(1)

    return hook


def _log_tail(path: Path, offset: int = 0, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else "(log is empty)"


_probe_ids = itertools.count(1)


def mqtt_handshake(
    host: str, port: int, timeout: float = 1.0, any_answer: bool = False, tls: ssl.SSLContext | None = None
) -> bool:
    """A real MQTT 3.1.1 CONNECT/CONNACK, not just an open port: the broker must be ready to serve clients.

    With `any_answer`, a refusal counts too: a broker that wants a login answers this anonymous probe "not authorised".
    With `tls`, the probe speaks TLS with that context (it checks the broker's certificate as the context says).
    """
    client_id = f"localservices-probe-{os.getpid()}-{next(_probe_ids)}".encode()
    variable = b"\x00\x04MQTT\x04\x02\x00\x0a"  # "MQTT", level 4 (3.1.1), clean session, keepalive 10 s
    body = variable + len(client_id).to_bytes(2, "big") + client_id
    packet = bytes([0x10, len(body)]) + body  # the body is < 128 bytes, so one remaining-length byte
    reply = b""
    try:
        with contextlib.ExitStack() as stack:
            s = stack.enter_context(socket.create_connection((host, port), timeout=timeout))
            if tls is not None:
                s = stack.enter_context(tls.wrap_socket(s, server_hostname=host))
            s.sendall(packet)
            while len(reply) < 4:
                chunk = s.recv(4 - len(reply))
                if not chunk:
                    return False
                reply += chunk
            s.sendall(b"\xe0\x00")  # DISCONNECT, so the broker logs a clean goodbye
    except OSError:
        return False
    return reply[:2] == b"\x20\x02" and (any_answer or reply[3] == 0)  # CONNACK; return code 0 is "accepted"


class _Service:
    """One child process with a config in `workdir`, output in `workdir/<name>.log`, and fixed ports."""

    name: ClassVar[str]
    binary: ClassVar[str]
    fallback: ClassVar[str]
    package: ClassVar[str]

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.log_path = self.workdir / f"{self.name}.log"
        self._port = port if port is not None else find_free_port()
        # A port we chose may be re-chosen if taken before the first start; a caller's or a restart's may not.
        self._may_repick = port is None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        """The process id while running (benchmarks read its CPU time and memory from /proc)."""
        if self._proc is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._proc.pid

    def _write_config(self) -> list[str]:
        """Write the config file; return the arguments after the binary."""
        raise NotImplementedError

    def _ready(self, timeout: float) -> bool:
        raise NotImplementedError

    def _repick_ports(self) -> None:
        self._port = find_free_port()

    def start(self, timeout: float = 10.0) -> None:
        """Start and wait until the service really answers; a no-op when already running."""
        if self.running:
            return
        binary = find_binary(self.binary, self.fallback, self.package)
        self.workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, 4):
            try:
                self._spawn(binary, timeout)
            except _PortTaken:
                if not self._may_repick or attempt == 3:
                    raise
                self._repick_ports()
            else:
                break
        self._may_repick = False  # from now on the port is the service's address: restart() must keep it

    def _spawn(self, binary: str, timeout: float) -> None:
        args = [binary, *self._write_config()]
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:  # a file, not a pipe: nobody has to drain it
            self._proc = proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in a terminal reaches only us; we stop the service in order
                preexec_fn=_die_with_parent(),  # only prctl, resolved before the fork
            )
        deadline = time.monotonic() + timeout
        try:
            while True:
                code = proc.poll()
                if code is not None:
                    self._proc = None
                    tail = _log_tail(self.log_path, offset)
                    error = _PortTaken if "address already in use" in tail.lower() else ServiceUnavailable
                    message = f"{self.name} exited with code {code} while starting; {self.log_path}:\n{tail}"
                    raise error(message)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ServiceUnavailable(
                        f"{self.name} did not answer on {self.url} within {timeout:g} s; "
                        f"{self.log_path} ends with:\n{_log_tail(self.log_path, offset)}"
                    )
                if self._ready(min(0.5, remaining)) and proc.poll() is None:
                    return
                time.sleep(0.02)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM, up to 10 s for a clean shutdown (influxd closes its WAL), then SIGKILL. Safe to repeat."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=10)

    def kill(self) -> None:
        """An unclean death (SIGKILL), for fault tests."""
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=10)

    def restart(self, timeout: float = 10.0) -> None:
        """Stop and start again on the same port(s) with the same data."""
        self.stop()
        self.start(timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.url} {state} in {self.workdir}>"


class Mosquitto(_Service):
    """Debian's mosquitto 2.0: anonymous, no persistence, loopback only; or the caller's `config`."""

    name = "mosquitto"
    # Tests of at-least-once delivery across a broker restart set this before (re)starting: subscribers with
    # clean_session=False then get what was queued for them while they and the broker were away.
    persistence = False
    binary = "mosquitto"
    fallback = "/usr/sbin/mosquitto"
    package = "mosquitto"

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        config: Callable[[str, int], str] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """`config(host, port)` is the whole broker config instead of ours (the tests of the shipped deploy/mosquitto
        files substitute only the listener and the paths); it is ready when it answers, even "not authorised".
        `tls`: the config's listener speaks TLS, and the readiness probe connects with this context."""
        super().__init__(workdir, port)
        self.config = config
        self.tls = tls

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def _write_config(self) -> list[str]:
        # As root, mosquitto drops to the mosquitto user: that change of credentials clears the parent-death
        # signal (a killed test run would leave the broker behind) and it could not open files in our folder.
        # Logging goes to stderr, an inherited log file: stdout would be block-buffered.
        run_as = "user root\n" if os.geteuid() == 0 else ""
        conf = self.workdir / "mosquitto.conf"
        if self.config is not None:
            conf.write_text(run_as + self.config(self.host, self.port))
            return ["-c", str(conf)]
        conf.write_text(
            f"{run_as}listener {self.port} {self.host}\n"
            "allow_anonymous true\n"
            + (
                f"persistence true\npersistence_location {self.workdir}/\nautosave_interval 1\n"
                if self.persistence
                else "persistence false\n"
            )
            + "set_tcp_nodelay true\n"
            "max_queued_messages 100000\n"
            "log_dest stderr\n"
            "log_timestamp_format %Y-%m-%dT%H:%M:%S\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
        )
        return ["-c", str(conf)]

    def _ready(self, timeout: float) -> bool:
        return mqtt_handshake(self.host, self.port, timeout, any_answer=self.config is not None, tls=self.tls)


# Proxies from the environment must not see loopback requests.
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Influxd(_Service):
    """Debian's InfluxDB 1.6: the v1 HTTP API, with a standard-library client independent of the gateway's."""

    name = "influxd"
    binary = "influxd"
    fallback = "/usr/bin/influxd"
    package = "influxdb"

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        super().__init__(workdir, port)
        self.rpc_port = self._other_port()

    def _other_port(self) -> int:
        while (port := find_free_port()) == self._port:
            pass
        return port

    def _repick_ports(self) -> None:
        super()._repick_ports()
        self.rpc_port = self._other_port()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _write_config(self) -> list[str]:
        data = self.workdir / "data"
        conf = self.workdir / "influxdb.conf"
        conf.write_text(
            f"""# Written by devtools.localservices: loopback only, data here, every listener but HTTP off.
reporting-disabled = true
reporting-enabled = false  # Debian's patched name for the same switch
bind-address = "{self.host}:{self.rpc_port}"

[meta]
  dir = "{data / "meta"}"
  logging-enabled = false

[data]
  dir = "{data / "data"}"
  wal-dir = "{data / "wal"}"
  wal-fsync-delay = "0s"
  query-log-enabled = false

[retention]
  enabled = false

[monitor]
  store-enabled = false

[subscriber]
  enabled = false

[http]
  enabled = true
  bind-address = "{self.host}:{self.port}"
  log-enabled = false
  suppress-write-log = true

[logging]
  level = "warn"
  suppress-logo = true

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
        return ["-config", str(conf)]

    def _ready(self, timeout: float) -> bool:
        try:
            with _http.open(f"{self.url}/ping", timeout=timeout) as resp:
                return int(resp.status) == 204
        except (OSError, urllib.error.URLError):
            return False

    def _request(self, method: str, path: str, params: dict[str, str], data: bytes | None = None) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        req = urllib.request.Request(url, data=data, method=method)
        try:
            with _http.open(req, timeout=10) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace").strip()
            raise InfluxError(f"influxd {method} {path} answered {exc.code}: {detail}") from exc
        return json.loads(body) if body else None

    def _statement(self, method: str, params: dict[str, str]) -> list[dict[str, Any]]:
        doc = self._request(method, "/query", params) or {}
        if "error" in doc:
            raise InfluxError(f"influxd query {params['q']!r} failed: {doc['error']}")
        results: list[dict[str, Any]] = doc.get("results") or [{}]
        for result in results:
            if "error" in result:
                raise InfluxError(f"influxd query {params['q']!r} failed: {result['error']}")
        return list(results[0].get("series", []))

    def create_database(self, name: str) -> None:
        quoted = name.replace("\\", "\\\\").replace('"', '\\"')
        self._statement("POST", {"q": f'CREATE DATABASE "{quoted}"'})

    def write(self, db: str, lines: str) -> None:
        """Line protocol with nanosecond timestamps, as the gateway writes it."""
        self._request("POST", "/write", {"db": db, "precision": "ns"}, lines.encode())

    def query(self, db: str, q: str) -> list[dict[str, Any]]:
        """The first statement's series ([] when empty), times in epoch ns; an error in the result raises."""
        return self._statement("GET", {"db": db, "q": q, "epoch": "ns"})
