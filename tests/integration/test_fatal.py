"""Fatal means non-zero, named in one line with the fix, and no secret in any output (issue 12, observations 6, 7).

The real CLI, as systemd and compose run it. The sinks point at closed ports (nothing here needs a broker or a
database): every fault below is found by the gateway itself, before it opens a port where it can be.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from devtools.localservices import find_free_port
from gateway.preflight import EXIT_CONFIG, EXIT_STORAGE

CLOSED = 9  # discard: nothing listens on it on a test machine


def _config(
    tmp_path: Path, data_dir: Path | None = None, mqtt: str = "", influx_url: str = "", health_port: int = 0
) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(
        f"""
[gateway]
data_dir = "{data_dir or tmp_path / "data"}"
health_port = {health_port or find_free_port()}
status_interval_s = 0.2
[mqtt]
host = "127.0.0.1"
port = {CLOSED}
{mqtt}
[influx]
api = "v1"
url = "{influx_url or f"http://127.0.0.1:{CLOSED}"}"
database = "x"
"""
    )
    return path


def _run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30, fsize: int | None = None
) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        preexec_fn=limit,
        check=False,
    )


def _fatal_line(out: str) -> str:
    """The one line that says what was fatal; there is exactly one, and no traceback."""
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if "fatal:" in line]
    assert len(lines) == 1, out
    return lines[0]


def test_a_missing_secret_exits_2_before_any_port_is_opened(tmp_path: Path) -> None:
    """It was found by the MQTT sink after the health port opened: `task sink-mqtt failed: ConfigError`, exit 0."""
    config = _config(tmp_path, mqtt='username = "gw"\npassword = { env = "MQTT_PASSWORD_NOT_SET" }')
    env = {k: v for k, v in os.environ.items() if k != "MQTT_PASSWORD_NOT_SET"}
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert out.returncode == EXIT_CONFIG, out.stderr
    line = _fatal_line(out.stderr)
    assert "mqtt.password" in line and "MQTT_PASSWORD_NOT_SET" in line and "export" in line
    assert "health endpoint on" not in out.stderr and "started" not in out.stderr


def test_a_bad_infusion_devices_variable_is_a_named_error_not_a_traceback(tmp_path: Path) -> None:
    config = _config(tmp_path)
    for command in (["run", "--config", str(config)], ["check-config", str(config)]):
        out = _run(*command, env={"INFUSION_DEVICES": "not json"})
        assert out.returncode == EXIT_CONFIG, out.stderr
        assert "Traceback" not in out.stderr
        assert "INFUSION_DEVICES" in out.stderr and "JSON" in out.stderr


def test_an_unwritable_data_dir_exits_3_with_the_fix(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the data directory's parent should be")
    out = _run("run", "--config", str(_config(tmp_path, data_dir=blocker / "data")))
    assert out.returncode == EXIT_STORAGE, out.stderr
    line = _fatal_line(out.stderr)
    assert "data_dir" in line and str(blocker / "data") in line and "->" in line
    assert "health endpoint on" not in out.stderr


def test_an_outbox_that_cannot_be_opened_exits_3(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "outbox.sqlite3").mkdir(parents=True)  # a directory where the database file should be
    out = _run("run", "--config", str(_config(tmp_path, data_dir=data)))
    assert out.returncode == EXIT_STORAGE, out.stderr
    line = _fatal_line(out.stderr)
    assert "outbox" in line and "->" in line
    assert "health endpoint on" not in out.stderr


def _start_limited(config: Path, fsize: int, log: Path) -> subprocess.Popen[bytes]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=limit,
    )


def _until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.1)


def test_a_disk_error_at_start_is_not_mistaken_for_corruption(tmp_path: Path) -> None:
    """A write error opening the outbox used to move the whole outbox aside as "corrupt" (what was owed left
    behind in a file nobody delivers) and then crash with a traceback. Now: either a named storage exit at start,
    or the storage state (records in memory) until stopped, then a named storage exit; never moved aside."""
    data = tmp_path / "data"
    log = tmp_path / "gateway.log"
    proc = _start_limited(_config(tmp_path, data_dir=data), 64 * 1024, log)
    try:
        _until(lambda: proc.poll() is not None or "cannot be written" in log.read_text(), 30, "exit or storage state")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    out = log.read_text()
    assert proc.returncode == EXIT_STORAGE, out[-3000:]
    assert "outbox" in _fatal_line(out) or "records could not be saved" in _fatal_line(out)
    assert not list(data.glob("*.corrupt-*")), "a disk error moved the outbox aside"


def test_a_write_limit_while_running_is_the_storage_state_not_an_exit(tmp_path: Path) -> None:
    """The disk fills while the gateway runs (RLIMIT_FSIZE: SQLite's writes fail as on a full disk). It exited 0
    after `task status failed: OperationalError('cannot rollback - no transaction is active')`. Now it keeps
    running in the storage state (/health: storage down), and a stop that loses what waited in memory exits 3."""
    health_port = find_free_port()
    log = tmp_path / "gateway.log"
    proc = _start_limited(_config(tmp_path, health_port=health_port), 256 * 1024, log)
    try:
        _until(lambda: _storage(health_port) == "down" or proc.poll() is not None, 60, "storage reported down")
        assert proc.poll() is None, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    out = log.read_text()
    assert "cannot rollback" not in out
    if proc.returncode == 0:  # the last commit got through after all (a checkpoint made room): nothing was lost
        assert "records not saved" not in out and "could not be saved" not in out, out[-3000:]
    else:  # what waited in memory was lost with the stop: said, and not as a success
        assert proc.returncode == EXIT_STORAGE, out[-3000:]
        assert "records could not be saved" in _fatal_line(out)


def _storage(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            links = json.loads(response.read()).get("links", {})
            return None if links.get("storage") is None else str(links["storage"])
    except OSError:
        return None


def test_credentials_in_the_influx_url_and_secrets_never_reach_any_output(tmp_path: Path) -> None:
    """`check-config` printed the URL with user:password, and every InfluxDB retry logged it."""
    health_port = find_free_port()
    config = _config(
        tmp_path,
        health_port=health_port,
        mqtt='username = "gw"\npassword = { env = "TEST_MQTT_SECRET" }',
        influx_url=f"http://reader:url-secret-7731@127.0.0.1:{CLOSED}",
    )
    env = {"TEST_MQTT_SECRET": "mqtt-secret-4455"}
    checked = _run("check-config", str(config), env=env)
    assert checked.returncode == 0, checked.stderr
    assert "url-secret-7731" not in checked.stdout + checked.stderr
    assert f"http://***@127.0.0.1:{CLOSED}" in checked.stdout

    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
    )
    try:
        time.sleep(4)  # several reconnect attempts of both sinks, each logged
        with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/health", timeout=5) as resp:
            health = resp.read().decode()
        assert json.loads(health)["state"] == "degraded"
        assert "url-secret-7731" not in health and "mqtt-secret-4455" not in health
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, output[-3000:]
    assert output.count("influx unavailable") >= 2, output[-3000:]
    assert "url-secret-7731" not in output and "mqtt-secret-4455" not in output
