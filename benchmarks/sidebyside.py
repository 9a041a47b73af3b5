"""The gateway and the Node-RED peer side by side in one run (issue 19): `python -m benchmarks.sidebyside`.

Both sides get the same of everything but themselves: the peer's feeder (benchmarks/peer/feeder.py: byte-exact Masimo
ASCII 1 lines on ptys, device i offset by i/N s, its write times logged), a fresh mosquitto and influxd from
devtools.localservices for every run, and one counter process (benchmarks/mqttlog.py) that stamps every message on
arrival. The two sides run alternately (peer first in odd runs, gateway first in even ones), at least 3 runs per
configuration, and every ratio is ours / peer of the same alternation, reported as median and range over the runs of
this invocation only: no figure from another run or machine is ever divided by.

Measured over a steady window (60 s after 5 s of feeding): CPU of the side's process tree as a share of one core
(utime + stime + reaped children's, from /proc), steady RSS of the tree (mean of 1 s samples), influxd's and
mosquitto's CPU, and the write on the pty -> arrival at the counter latency of every reading written in the window,
matched by (device, device time). After the window every reading the feeder wrote is counted on MQTT (unique,
missing, duplicates) and in InfluxDB (count of spo2, and of perfusion_index against the lines that carry one).

Without `node` on PATH the gateway's figures are printed alone, with a line saying that no ratio was measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from benchmarks.peer.make_flow import build_flow
from devtools.localservices import Influxd, Mosquitto, find_free_port

ROOT = Path(__file__).resolve().parents[1]
PEER_DIR = ROOT / "benchmarks" / "peer"
FEEDER = PEER_DIR / "feeder.py"
NODE_RED = PEER_DIR / "node_modules" / "node-red" / "red.js"
DB = "vitals"
SITE = "bench"
TICK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
SIDES = ("peer", "gateway")


class BenchError(RuntimeError):
    """A run could not be measured; the message names the step and the log to read."""


# --- what is measured, from /proc ---------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # fields[0] is field 3 (state)


def tree(root: int) -> list[int]:
    """root and all its descendants, from the parent ids in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):  # a process that ended while we looked: not in the tree
                children.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def cpu_s(pids: list[int]) -> float:
    """utime + stime of each process and of its reaped children (a child that ends in the window is not lost)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):  # ended since tree(): its time moved to its parent's reaped children
            f = _stat_fields(pid)
            total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total / TICK


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KB
    return total / 1024


def pct(ordered: list[float], p: float) -> float:
    """The nearest-rank percentile of a sorted list (as the peer's report.py computes it)."""
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# --- the two sides ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    n: int
    one_room: bool
    sides: tuple[str, ...] = SIDES

    @property
    def label(self) -> str:
        return f"{self.n}, {'all in one room' if self.one_room else 'a room each'}"

    def devices(self) -> list[tuple[str, str]]:
        """(room, device) of feeder device i."""
        w = max(3, len(str(self.n - 1)))
        return [("room1" if self.one_room else f"room{i:0{w}d}", f"pox{i:0{w}d}") for i in range(self.n)]


@dataclass
class Side:
    """How one side is started, when it is ready, and where its messages arrive."""

    name: str
    topics: list[str]
    reading_suffix: str
    alert_suffix: str
    start: Callable[[Path, Layout, Mosquitto, Influxd, list[Path]], subprocess.Popen[bytes]]
    ready: Callable[[Path, Layout, Path], bool]


def _start_gateway(
    work: Path,
    layout: Layout,
    broker: Mosquitto,
    influx: Influxd,
    ports: list[Path],
    python_args: tuple[str, ...] = (),
) -> subprocess.Popen[bytes]:
    """The gateway as clinic IT runs it (`python -m gateway run`); `python_args` go before `-m` (a profiler)."""
    lines = [
        "[gateway]",
        f'site = "{SITE}"',
        'id = "bench-gw"',
        f'data_dir = "{work / "gateway"}"',
        'log_level = "WARNING"',
        "health_port = 0",
        "[mqtt]",
        'host = "127.0.0.1"',
        f"port = {broker.port}",
        "[influx]",
        'api = "v1"',
        f'url = "{influx.url}"',
        f'database = "{DB}"',
    ]
    for (room, name), port in zip(layout.devices(), ports, strict=True):
        lines += ["[[devices]]", f'room = "{room}"', f'name = "{name}"', 'model = "masimo-ascii1"', f'port = "{port}"']
    config = work / "gateway.toml"
    config.write_text("\n".join(lines) + "\n")
    with (work / "gateway.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, *python_args, "-m", "gateway", "run", "--config", str(config)],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def _gateway_ready(work: Path, layout: Layout, counter_log: Path) -> bool:
    """Every device's status has said connected (the gateway publishes it once a port is open)."""
    connected = set()
    for _t, topic, payload in _log_lines(counter_log):
        if topic.endswith("/status") and json.loads(payload).get("state") == "connected":
            connected.add(topic)
    return len(connected) >= layout.n


def _start_peer(
    work: Path, layout: Layout, broker: Mosquitto, influx: Influxd, ports: list[Path]
) -> subprocess.Popen[bytes]:
    userdir = work / "userdir"
    userdir.mkdir(parents=True, exist_ok=True)
    devices = [(str(p), name, room) for (room, name), p in zip(layout.devices(), ports, strict=True)]
    flow = build_flow(devices, (broker.host, broker.port), (influx.host, influx.port), DB)
    (userdir / "flows.json").write_text(json.dumps(flow, indent=1) + "\n")
    node = shutil.which("node")
    if node is None:
        raise BenchError("node is not on PATH")
    env = {**os.environ, "NR_UI_PORT": str(find_free_port()), "NR_USER_DIR": str(userdir)}
    with (work / "nodered.log").open("ab") as log:
        return subprocess.Popen(
            [node, str(NODE_RED), "--settings", str(PEER_DIR / "settings.js"), "--userDir", str(userdir)],
            cwd=PEER_DIR,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )


def _peer_ready(work: Path, layout: Layout, counter_log: Path) -> bool:
    """As the peer's run_peer.sh: every port opened and the broker connected, from Node-RED's log."""
    text = (work / "nodered.log").read_text(errors="replace")
    return text.count("opened at 9600") >= layout.n and "Connected to broker" in text


GATEWAY = Side(
    "gateway",
    [f"infusion/{SITE}/+/+/reading", f"infusion/{SITE}/+/+/status", f"infusion/{SITE}/+/alarms/events"],
    "/reading",
    "/alarms/events",
    _start_gateway,
    _gateway_ready,
)
PEER = Side("peer", ["nodered/#"], "/vitals", "/alerts", _start_peer, _peer_ready)


# --- one run of one side ------------------------------------------------------------------------------------------


def _log_lines(path: Path) -> Iterator[tuple[float, str, str]]:
    """(arrival, topic, payload) of every complete line of the counter's log."""
    if not path.exists():
        return
    with path.open("rb") as f:
        for raw in f:
            if raw.endswith(b"\n"):
                t, topic, payload = raw.decode().rstrip("\n").split(" ", 2)
                yield float(t), topic, payload


def _wait(what: str, predicate: Callable[[], bool], within_s: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {within_s:g} s waiting for {what}" + (f"; see {log}" if log else ""))
        time.sleep(0.2)


def _read_line(proc: subprocess.Popen[bytes], stream: IO[bytes], what: str, within_s: float) -> str:
    ready, _, _ = select.select([stream], [], [], within_s)
    if not ready:
        raise BenchError(f"timed out after {within_s:g} s waiting for {what}")
    line = stream.readline().decode().strip()
    if not line:
        raise BenchError(f"{what}: the process ended (exit code {proc.wait()})")
    return line


def _stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, within_s: float = 20) -> None:
    """Stop one process we started, by its pid; SIGKILL if it does not end in time."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=within_s)
    except subprocess.TimeoutExpired:
        print(f"  warning: pid {proc.pid} ignored signal {sig} for {within_s:g} s: killed", file=sys.stderr)
        proc.kill()
        proc.wait(timeout=10)


def _norm_device_time(text: str) -> str:
    """The feeder's and the peer's MM/DD/YY HH:MM:SS in the gateway's ISO form (2016-02-22T22:47:45)."""
    if "/" in text:
        return datetime.strptime(text, "%m/%d/%y %H:%M:%S").strftime("%Y-%m-%dT%H:%M:%S")
    return text


def start_counter(broker: Mosquitto, log: Path, topics: list[str], stderr: IO[bytes] | int) -> subprocess.Popen[bytes]:
    """The counter (benchmarks/mqttlog.py), returned once it has subscribed."""
    counter = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.mqttlog", str(broker.port), str(log), *topics],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=stderr,
    )
    try:
        assert counter.stdout is not None
        _read_line(counter, counter.stdout, f"the counter to subscribe (see {log.parent / 'counter.err'})", 15)
    except BaseException:
        _stop(counter)
        raise
    return counter


def start_feeder(n: int, work: Path, log: Path, err: Path, err_file: IO[bytes], *extra: str) -> subprocess.Popen[bytes]:
    """The peer's feeder with n ptys under work/tty, returned once they are ready; it writes on SIGUSR1."""
    feed = ["--dir", str(work / "tty"), "--log", str(log), *extra, "--wait-signal"]
    feeder = subprocess.Popen([sys.executable, str(FEEDER), str(n), *feed], stdin=subprocess.DEVNULL, stderr=err_file)
    try:
        _wait("the feeder's ptys", lambda: "ptys ready" in err.read_text(), 30 + n / 20, err)
    except BaseException:
        _stop(feeder, within_s=30)
        raise
    return feeder


def run_once(side: Side, layout: Layout, work: Path, warmup_s: float, window_s: float) -> dict[str, Any]:
    """One side, one layout: start everything, feed, measure the window, count everything, stop everything."""
    work.mkdir(parents=True, exist_ok=True)
    counter_log, feeder_log = work / "mqtt.log", work / "feeder.log"
    index = {name: i for i, (_room, name) in enumerate(layout.devices())}
    desat_at = warmup_s + window_s / 2  # device 0 reads SpO2 85 from the middle of the window, as in the peer's runs
    counter = feeder = proc = None
    feeder_err = work / "feeder.err"
    with (
        Mosquitto(work / "mosquitto") as broker,
        Influxd(work / "influxd") as influx,
        (work / "counter.err").open("ab") as counter_err,
        feeder_err.open("ab") as feeder_err_file,
    ):
        influx.create_database(DB)
        try:
            counter = start_counter(broker, counter_log, side.topics, counter_err)
            feeder = start_feeder(
                layout.n, work, feeder_log, feeder_err, feeder_err_file, "--desat-at", f"{desat_at:g}"
            )
            ports = [work / "tty" / f"tty{i}" for i in range(layout.n)]
            proc = side.start(work, layout, broker, influx, ports)
            log = work / ("gateway.log" if side is GATEWAY else "nodered.log")

            def ready() -> bool:
                if proc is not None and proc.poll() is not None:
                    raise BenchError(f"the {side.name} exited with code {proc.returncode} while starting; see {log}")
                return side.ready(work, layout, counter_log)

            _wait(f"the {side.name} to open {layout.n} ports and connect", ready, 60 + layout.n / 5, log)
            time.sleep(2)  # let start-up work settle (as run_peer.sh does)
            feeder.send_signal(signal.SIGUSR1)
            time.sleep(warmup_s)
            pids = tree(proc.pid)
            c0 = (cpu_s(pids), cpu_s([influx.pid]), cpu_s([broker.pid]))
            t0 = time.time()
            rss: list[float] = []
            while (left := t0 + window_s - time.time()) > 0:
                rss.append(rss_mib(tree(proc.pid)))
                time.sleep(min(1.0, left))
            pids = tree(proc.pid)
            c1 = (cpu_s(pids), cpu_s([influx.pid]), cpu_s([broker.pid]))
            t1 = time.time()
            if proc.poll() is not None:
                raise BenchError(f"the {side.name} exited with code {proc.returncode} in the window; see {log}")
            _stop(feeder, within_s=30)
            written = sum(1 for _ in feeder_log.open())

            def counts() -> tuple[int, int]:
                rows = influx.query(DB, 'SELECT count("spo2"), count("perfusion_index") FROM "vitals"')
                return (int(rows[0]["values"][0][1]), int(rows[0]["values"][0][2])) if rows else (0, 0)

            def drained() -> bool:
                on_mqtt = sum(1 for _t, topic, _p in _log_lines(counter_log) if topic.endswith(side.reading_suffix))
                return on_mqtt >= written and counts()[0] >= written

            try:
                _wait("every reading on both sinks", drained, 30 + layout.n / 20)
            except BenchError as exc:  # an incomplete count is a result (all_counted false), not the end of the run
                print(f"  warning: {side.name}, {layout.label}: {exc}; counting what arrived", file=sys.stderr)
            time.sleep(1)  # duplicates and stragglers
            influx_spo2, influx_pi = counts()
        finally:
            _stop(proc)
            _stop(feeder, within_s=30)
            _stop(counter)
    return _summary(side, layout, work, (t0, t1), c0, c1, rss, influx_spo2, influx_pi, index)


def _summary(
    side: Side,
    layout: Layout,
    work: Path,
    window: tuple[float, float],
    c0: tuple[float, float, float],
    c1: tuple[float, float, float],
    rss: list[float],
    influx_spo2: int,
    influx_pi: int,
    index: dict[str, int],
) -> dict[str, Any]:
    t0, t1 = window
    written: dict[tuple[int, str], float] = {}
    with_pi = 0
    for line in (work / "feeder.log").open():
        t, i, _seq, day, hms, _spo2, pi = line.split()
        written[(int(i), _norm_device_time(f"{day} {hms}"))] = float(t)
        with_pi += "-" not in pi
    arrivals: dict[tuple[int, str], list[float]] = {}
    alerts = 0
    for t_arr, topic, payload in _log_lines(work / "mqtt.log"):
        if topic.endswith(side.reading_suffix):
            msg = json.loads(payload)
            key = (index[topic.split("/")[-2]], _norm_device_time(str(msg.get("device_time"))))
            arrivals.setdefault(key, []).append(t_arr)
        elif topic.endswith(side.alert_suffix):
            alerts += 1
    latency = sorted(ts[0] - written[k] for k, ts in arrivals.items() if k in written and t0 <= written[k] <= t1)
    in_window = sum(1 for t in written.values() if t0 <= t <= t1)
    secs = t1 - t0
    cpu = c1[0] - c0[0]
    missing = len(set(written) - set(arrivals))
    row = {
        "side": side.name,
        "devices": layout.n,
        "layout": layout.label,
        "window_s": round(secs, 2),
        "cpu_pct": round(100 * cpu / secs, 2),
        "cpu_ms_per_reading": round(1000 * cpu / in_window, 3) if in_window else None,
        "rss_mib_steady": round(statistics.fmean(rss), 1) if rss else None,
        "rss_mib_max": round(max(rss), 1) if rss else None,
        "influxd_cpu_pct": round(100 * (c1[1] - c0[1]) / secs, 2),
        "mosquitto_cpu_pct": round(100 * (c1[2] - c0[2]) / secs, 2),
        "lines_written": len(written),
        "lines_in_window": in_window,
        "mqtt_unique": sum(1 for k in arrivals if k in written),
        "mqtt_missing": missing,
        "mqtt_duplicates": sum(len(ts) - 1 for ts in arrivals.values()),
        "mqtt_unknown": sum(1 for k in arrivals if k not in written),
        "influx_points": influx_spo2,
        "influx_points_with_pi": influx_pi,
        "lines_with_pi": with_pi,
        "alert_messages": alerts,
        "latency_n": len(latency),
        "p50_ms": round(1000 * pct(latency, 50), 2) if latency else None,
        "p99_ms": round(1000 * pct(latency, 99), 2) if latency else None,
        "max_ms": round(1000 * latency[-1], 2) if latency else None,
        "workdir": str(work),
    }
    row["all_counted"] = missing == 0 and influx_spo2 == len(written) and influx_pi == with_pi and len(written) > 0
    return row


# --- the whole comparison -----------------------------------------------------------------------------------------


def peer_available() -> str | None:
    """None when the peer can run; else why not (printed: 'no ratio was measured')."""
    if shutil.which("node") is None:
        return "node is not on PATH"
    if shutil.which("npm") is None and not NODE_RED.exists():
        return "npm is not on PATH and the peer is not installed"
    return None


def install_peer() -> None:
    """`npm ci` from the committed lock into benchmarks/peer/node_modules (git-ignored), when missing or stale."""
    stamp = PEER_DIR / "node_modules" / ".package-lock.json"
    if (
        NODE_RED.exists()
        and stamp.exists()
        and stamp.stat().st_mtime >= (PEER_DIR / "package-lock.json").stat().st_mtime
    ):
        return
    npm = shutil.which("npm")
    if npm is None:
        raise BenchError("the peer is not installed and npm is not on PATH")
    print("installing the peer: npm ci in benchmarks/peer (Node-RED 4.1.8 from the committed lock)", flush=True)
    done = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=PEER_DIR, capture_output=True, text=True
    )
    if done.returncode != 0 or not NODE_RED.exists():
        raise BenchError(f"npm ci in {PEER_DIR} failed ({done.returncode}):\n{done.stderr[-2000:]}")


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


METRICS = (
    ("cpu_pct", "CPU % of a core"),
    ("rss_mib_steady", "steady RSS MiB"),
    ("p99_ms", "p99 pty->MQTT ms"),
    ("cpu_ms_per_reading", "CPU ms per reading"),
    ("influxd_cpu_pct", "influxd CPU %"),
)


def aggregate(layout: Layout, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and range of each side's figures and of each ratio ours / peer of the same alternation."""
    by_side = {s: [r for r in runs if r["side"] == s] for s in SIDES}
    out: dict[str, Any] = {"layout": layout.label, "devices": layout.n, "runs": runs}
    for key, _label in METRICS:
        out[key] = {s: _spread([r[key] for r in by_side[s] if r[key] is not None]) for s in SIDES}
        pairs = [
            g[key] / p[key]
            for p, g in zip(by_side["peer"], by_side["gateway"], strict=False)
            if p[key] and g[key] is not None
        ]
        out[key]["ratio"] = _spread(pairs)
    out["all_counted"] = {
        s: f"{sum(r['all_counted'] for r in by_side[s])}/{len(by_side[s])}" if by_side[s] else "-" for s in SIDES
    }
    return out


def _fmt(spread: dict[str, float] | None, digits: int = 1, unit: str = "") -> str:
    if spread is None:
        return "-"
    if spread["min"] == spread["max"]:
        return f"{spread['median']:.{digits}f}{unit}"
    return f"{spread['median']:.{digits}f}{unit} ({spread['min']:.{digits}f}-{spread['max']:.{digits}f})"


def table(rows: list[dict[str, Any]], no_peer: str | None) -> str:
    """Markdown: per configuration and figure, peer and ours as median (range), and the ratio ours / peer."""
    out = [
        "| N, layout | figure | peer | ours | ours / peer |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        first = True
        for key, label in METRICS:
            digits = {"cpu_ms_per_reading": 3, "p99_ms": 2, "influxd_cpu_pct": 2}.get(key, 1)
            ratio = _fmt(row[key]["ratio"], 2, "x")
            if row[key]["ratio"] is None and no_peer:
                ratio = "not measured"
            out.append(
                f"| {row['layout'] if first else ''} | {label} | {_fmt(row[key]['peer'], digits)} "
                f"| {_fmt(row[key]['gateway'], digits)} | {ratio} |"
            )
            first = False
        counted = row["all_counted"]
        out.append(
            f"| | runs with every reading counted (MQTT, InfluxDB) | {counted['peer']} | {counted['gateway']} | |"
        )
    return "\n".join(out)


def measure(
    sizes: list[int],
    site: int,
    reps: int,
    window_s: float,
    warmup_s: float,
    workdir: Path,
    progress: Callable[[str], None] = print,
    gateway_only: bool = False,
) -> dict[str, Any]:
    """Every configuration, alternating sides; returns the runs, the aggregates and the printed table."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 3 * max([*sizes, site]) + 256  # the feeder holds 2 fds a device, the gateway 1
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard) if hard != resource.RLIM_INFINITY else need, hard))
    no_peer = "not run (--gateway-only)" if gateway_only else peer_available()
    if no_peer is None:
        install_peer()
    sides = (PEER, GATEWAY) if no_peer is None else (GATEWAY,)
    layouts = [Layout(n, one) for n in sizes for one in (False, True)]
    if site:
        layouts.append(Layout(site, False, ("gateway",)))
    rows: list[dict[str, Any]] = []
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_before = os.getloadavg()
    for layout in layouts:
        runs: list[dict[str, Any]] = []
        mine = [s for s in sides if s.name in layout.sides]
        for rep in range(reps):
            for side in mine if rep % 2 == 0 else mine[::-1]:
                work = workdir / f"n{layout.n}-{'one' if layout.one_room else 'each'}" / f"{rep + 1}-{side.name}"
                row = run_once(side, layout, work, warmup_s, window_s)
                row["rep"] = rep + 1
                runs.append(row)
                progress(
                    f"  {layout.label:24} run {rep + 1} {side.name:7}: CPU {row['cpu_pct']:5.1f} %, "
                    f"RSS {row['rss_mib_steady']} MiB, p99 {row['p99_ms']} ms (max {row['max_ms']}), "
                    f"influxd {row['influxd_cpu_pct']} %; MQTT {row['mqtt_unique']}/{row['lines_written']} "
                    f"(dup {row['mqtt_duplicates']}), InfluxDB {row['influx_points']}/{row['lines_written']}"
                    + ("" if row["all_counted"] else "  ** NOT ALL COUNTED **")
                )
        rows.append(aggregate(layout, runs))
    return {
        "started": started,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "window_s": window_s,
        "warmup_s": warmup_s,
        "reps": reps,
        "peer": "measured" if no_peer is None else f"not measured: {no_peer}",
        "rows": rows,
        "table": table(rows, no_peer),
    }


def report(result: dict[str, Any]) -> str:
    lines = [
        f"side by side, {result['started']}: {result['window_s']:g} s windows after {result['warmup_s']:g} s of "
        f"feeding, {result['reps']} alternating runs per configuration; median (range) over the runs; the ratio is "
        f"ours / peer of the same alternation, this run only. Load average before {result['load_average_before']}, "
        f"after {result['load_average_after']}.",
        result["table"],
    ]
    if result["peer"] != "measured":
        lines.append(f"NO RATIO WAS MEASURED: the peer did not run ({result['peer'].removeprefix('not measured: ')}).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 s windows after 2 s of feeding (a smoke run)")
    parser.add_argument("--window", type=float, help="seconds measured per run (default 60, --quick 10)")
    parser.add_argument("--reps", type=int, default=3, help="alternating runs per configuration (default 3)")
    parser.add_argument(
        "--sizes", type=int, nargs="*", default=[100, 200], help="N of the side-by-side runs (none: site only)"
    )
    parser.add_argument("--site", type=int, default=1000, help="N of the gateway-only site run (0: none)")
    parser.add_argument("--keep", action="store_true", help="keep the run folders (logs) under the temp dir")
    parser.add_argument(
        "--gateway-only", action="store_true", help="the gateway's runs alone (while working on it: no ratio)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    result = run_cli(args.quick, args.window, args.reps, args.sizes, args.site, args.keep, args.gateway_only)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"sidebyside-{result['started'].replace(':', '')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


def run_cli(
    quick: bool,
    window: float | None,
    reps: int,
    sizes: list[int],
    site: int,
    keep: bool = False,
    gateway_only: bool = False,
) -> dict[str, Any]:
    """Measure, print the table and return the result (also used by `python -m benchmarks`)."""
    window_s = window if window is not None else 10 if quick else 60
    warmup_s = 2 if quick else 5
    workdir = Path(tempfile.mkdtemp(prefix="bench-sidebyside-"))
    configs = 2 * len(sizes) + (1 if site else 0)
    runs = reps * (2 * 2 * len(sizes) + (1 if site else 0))
    print(
        f"side by side with the Node-RED peer: {configs} configurations, {reps} alternating runs each ({runs} runs of "
        f"{window_s:g} s, about {runs * (window_s + warmup_s + 12) / 60:.0f} min); logs in {workdir}",
        flush=True,
    )
    try:
        result = measure(sizes, site, reps, window_s, warmup_s, workdir, lambda s: print(s, flush=True), gateway_only)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(report(result))
    return result


if __name__ == "__main__":
    main()
