"""Where the gateway's CPU goes under the side-by-side load: `python -m benchmarks.profile --devices 200`.

The same set-up as one gateway run of benchmarks/sidebyside.py (the peer's feeder on ptys, a fresh mosquitto and
influxd, the gateway as its own process), with py-spy (`pip install py-spy`) sampling the gateway for the window.
Writes py-spy's collapsed stacks (and a flame graph with --svg) and prints the functions with the most samples, on
their own (self) and with what they call (inclusive), and the share of each thread. Figures to read, not to compare:
sampling costs the gateway some CPU of its own.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.sidebyside import (
    DB,
    GATEWAY,
    TICK,
    BenchError,
    Layout,
    _start_gateway,
    _stop,
    _wait,
    cpu_s,
    start_counter,
    start_feeder,
    tree,
)
from devtools.localservices import Influxd, Mosquitto

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::(?P<line>\d+))?\)$")


def _frame_name(frame: str) -> str:
    """`func (path/to/file.py:12)` -> `file.py:func` (lines dropped, so one function is one name)."""
    match = FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    path = match["file"]
    short = "/".join(Path(path).parts[-2:]) if path else "?"
    short = short.replace("site-packages/", "")
    return f"{short}:{match['func']}"


def thread_cpu(pid: int) -> dict[int, tuple[float, float]]:
    """CPU seconds (utime, stime) of each thread of `pid`, by thread id."""
    out: dict[int, tuple[float, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, IndexError):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(task.name)] = (int(fields[11]) / TICK, int(fields[12]) / TICK)
    return out


def summarize(collapsed: Path, top: int = 25) -> str:
    """Self and inclusive sample shares per function, and per thread, from py-spy's raw (collapsed) output."""
    self_n: collections.Counter[str] = collections.Counter()
    incl_n: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for raw in collapsed.read_text(errors="replace").split("\n"):  # not splitlines: frames may hold \x1c, \x85
        stack, _, count_text = raw.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames[0] if frames[0].startswith(("thread", "process")) else "?"
        names = [_frame_name(f) for f in frames if not f.startswith(("thread", "process"))]
        total += count
        threads[thread] += count
        if names:
            self_n[names[-1]] += count
        for name in set(names):
            incl_n[name] += count
    if not total:
        return "no samples"
    out = [f"{total} samples"]
    out.append("threads:")
    out += [f"  {100 * n / total:5.1f} %  {name}" for name, n in threads.most_common(10)]
    out.append("self (the function's own code):")
    out += [f"  {100 * n / total:5.1f} %  {name}" for name, n in self_n.most_common(top)]
    out.append("inclusive (with what it calls):")
    out += [f"  {100 * n / total:5.1f} %  {name}" for name, n in incl_n.most_common(top)]
    return "\n".join(out)


def profile(
    n: int,
    one_room: bool,
    seconds: float,
    rate: int,
    work: Path,
    svg: bool,
    perf: bool = False,
    cprofile: bool = False,
    timeline: bool = False,
) -> Path:
    """Run the gateway under the feeder's load and sample it; returns the collapsed-stacks file."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise BenchError("py-spy is not installed: .venv/bin/pip install py-spy")
    layout = Layout(n, one_room, ("gateway",))
    work.mkdir(parents=True, exist_ok=True)
    counter_log, feeder_log, feeder_err = work / "mqtt.log", work / "feeder.log", work / "feeder.err"
    collapsed = work / "profile.txt"
    counter = feeder = proc = None
    with (
        Mosquitto(work / "mosquitto") as broker,
        Influxd(work / "influxd") as influx,
        feeder_err.open("ab") as feeder_err_file,
    ):
        influx.create_database(DB)
        try:
            counter = start_counter(broker, counter_log, GATEWAY.topics, subprocess.DEVNULL)
            feeder = start_feeder(n, work, feeder_log, feeder_err, feeder_err_file)
            ports = [work / "tty" / f"tty{i}" for i in range(n)]
            stats = work / "cprofile.out"
            python_args = ("-m", "cProfile", "-o", str(stats)) if cprofile else ()
            proc = _start_gateway(work, layout, broker, influx, ports, python_args)
            _wait("the gateway's ports", lambda: GATEWAY.ready(work, layout, counter_log), 60 + n / 5, work)
            time.sleep(2)
            feeder.send_signal(signal.SIGUSR1)
            time.sleep(5)
            c0, t0, threads0 = cpu_s(tree(proc.pid)), time.time(), thread_cpu(proc.pid)
            if cprofile:  # every call counted (the gateway runs slower under it): calls per reading
                time.sleep(seconds)
            elif perf:  # where the CPU goes below Python: the interpreter, SQLite, the kernel (per thread)
                data = work / "perf.data"
                sample = ["perf", "record", "-q", "-F", str(rate), "-g", "-p", str(proc.pid), "-o", str(data)]
                subprocess.run(
                    [*sample, "--", "sleep", f"{seconds:g}"],
                    check=True,
                    capture_output=True,
                )
                report = subprocess.run(
                    ["perf", "report", "-i", str(data), "--no-children", "--sort", "tid,dso", "--stdio", "-g", "none"],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                collapsed.write_text(report.stdout)
            else:
                record = [py_spy, "record", "--pid", str(proc.pid), "--duration", f"{seconds:g}", "--rate", str(rate)]
                record += ["--threads", "--nonblocking"]
                subprocess.run([*record, "--format", "raw", "-o", str(collapsed)], check=True, capture_output=True)
                if timeline:  # samples in order (speedscope's JSON): what held a thread through a stall
                    out = work / "timeline.speedscope.json"
                    subprocess.run([*record, "--idle", "--format", "speedscope", "-o", str(out)], check=True)
                    print(f"timeline: {out}")
            c1, t1, threads1 = cpu_s(tree(proc.pid)), time.time(), thread_cpu(proc.pid)
            print(f"gateway CPU while sampled: {100 * (c1 - c0) / (t1 - t0):.1f} % of a core ({n} devices)")
            for tid, (user, system) in sorted(threads1.items()):
                user0, system0 = threads0.get(tid, (0.0, 0.0))
                share = 100 * (user + system - user0 - system0) / (t1 - t0)
                if share >= 0.1:
                    kernel = 100 * (system - system0) / (t1 - t0)
                    print(f"  thread {tid}: {share:.1f} % of a core ({kernel:.1f} in the kernel)")
            if svg:
                out = work / "profile.svg"
                subprocess.run([*record, "--format", "flamegraph", "-o", str(out)], check=True, capture_output=True)
                print(f"flame graph: {out}")
        finally:
            _stop(proc)
            _stop(feeder)
            _stop(counter)
    if cprofile:
        import pstats

        written = len(feeder_log.read_bytes().splitlines())
        print(f"lines the feeder wrote in all (the profile covers the gateway's whole run): {written}")
        collapsed.write_text("")
        pstats.Stats(str(stats)).sort_stats("tottime").print_stats(40)
    return collapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--one-room", action="store_true")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--rate", type=int, default=200, help="samples a second (py-spy's --rate)")
    parser.add_argument("--svg", action="store_true", help="also record a flame graph (a second window)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--perf", action="store_true", help="perf record (per thread and library) in place of py-spy")
    parser.add_argument("--cprofile", action="store_true", help="run the gateway under cProfile (call counts)")
    parser.add_argument("--timeline", action="store_true", help="also a second window as py-spy's speedscope timeline")
    parser.add_argument("--out", type=Path, help="where the stacks go (default: a temp folder)")
    args = parser.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="bench-profile-"))
    collapsed = profile(
        args.devices, args.one_room, args.seconds, args.rate, work, args.svg, args.perf, args.cprofile, args.timeline
    )
    print(f"stacks: {collapsed}")
    print(collapsed.read_text()[:6000] if args.perf else summarize(collapsed, args.top))


if __name__ == "__main__":
    main()
