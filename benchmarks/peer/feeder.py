#!/usr/bin/env python3
"""Simulate N Masimo pulse oximeters ("ASCII 1" output) on pseudo-terminals. Stdlib only.

For each device i it opens a pty (slave put in raw mode), links DIR/tty<i> to the slave
(/dev/pts/K) and writes one line per second, CR LF terminated, device i offset by i/N s:

  02/22/16 22:47:45 SN=0000056661 SPO2=098% BPM=097 PI=03.60% SPCO=--.-% SPMET=--.-% DESAT=-- PIDELTA=+-- ...
  ... ALARM=0000 EXC=000800   (one line: LINE below)

Every 20th line of a device has PI=--.--% (missing value). With --desat-at S, device 0 reads
SpO2=085% from S seconds after the start (for --desat-len seconds, default: to the end).

Each write is logged to --log as "<epoch write time> <device> <seq> <device time> <spo2> <pi>";
the device time (MM/DD/YY HH:MM:SS, from the schedule) identifies a line per device, so a
subscriber can measure latency. Stops after --seconds, or on SIGTERM/SIGINT.
With --wait-signal it sets up the ptys, then waits for SIGUSR1 before writing.
"""

import argparse
import os
import random
import signal
import sys
import time
import tty
from typing import TextIO

LINE = (
    "{dt} SN={sn:010d} SPO2={spo2:03d}% BPM={bpm:03d} PI={pi}% "
    "SPCO=--.-% SPMET=--.-% DESAT=-- PIDELTA=+-- ALARM=0000 EXC=000800\r\n"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int, help="number of devices")
    ap.add_argument("--dir", default="/tmp/nodered-work", help="where the ttyN links go")
    ap.add_argument("--seconds", type=float, default=0, help="stop after this long (0: until signalled)")
    ap.add_argument("--desat-at", type=float, default=None, metavar="SECONDS")
    ap.add_argument("--desat-len", type=float, default=0, metavar="SECONDS", help="0: until the end")
    ap.add_argument("--log", default=None, help="write log (default: DIR/feeder.log)")
    ap.add_argument("--wait-signal", action="store_true", help="start writing on SIGUSR1")
    a = ap.parse_args()

    stop_sigs = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_sigs | {signal.SIGUSR1})

    os.makedirs(a.dir, exist_ok=True)
    masters: list[int] = []
    slaves: list[int] = []
    links: list[str] = []
    for i in range(a.n):
        m, s = os.openpty()
        tty.setraw(s)
        link = os.path.join(a.dir, f"tty{i}")
        tmp = link + ".new"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(os.ttyname(s), tmp)
        os.replace(tmp, link)  # atomic: a reader never sees a half-made link
        masters.append(m)
        slaves.append(s)
        links.append(link)  # keep the slave open: no hang-up
    print(f"feeder: {a.n} ptys ready in {a.dir} (tty0..tty{a.n - 1})", file=sys.stderr, flush=True)

    if a.wait_signal:
        got = signal.sigwait(stop_sigs | {signal.SIGUSR1})
        if got != signal.SIGUSR1:
            cleanup(links, masters, slaves, None, [0] * a.n)
            return

    log = open(a.log or os.path.join(a.dir, "feeder.log"), "w", buffering=1 << 16)  # noqa: SIM115 (closed by cleanup)
    rng = [random.Random(1000 + i) for i in range(a.n)]
    spo2 = [rng[i].randint(95, 99) for i in range(a.n)]
    bpm = [rng[i].randint(60, 95) for i in range(a.n)]
    counts = [0] * a.n
    t0 = time.time()
    # Schedule: device i writes its k-th line at t0 + k + i/N. Walk the schedule in time order.
    k, i = 0, 0
    while True:
        due = k + i / a.n
        if a.seconds and due >= a.seconds:
            break
        if signal.sigtimedwait(stop_sigs, max(0.0, t0 + due - time.time())) is not None:
            break
        r = rng[i]
        spo2[i] = min(100, max(93, spo2[i] + r.choice((-1, 0, 0, 1))))
        bpm[i] = min(110, max(55, bpm[i] + r.choice((-1, 0, 0, 1))))
        value = spo2[i]
        if (
            i == 0
            and a.desat_at is not None
            and due >= a.desat_at
            and (not a.desat_len or due < a.desat_at + a.desat_len)
        ):
            value = 85
        pi = "--.--" if k % 20 == 19 else f"{r.uniform(0.5, 9.9):05.2f}"
        dt = time.strftime("%m/%d/%y %H:%M:%S", time.localtime(t0 + due))  # device clock
        os.write(masters[i], LINE.format(dt=dt, sn=56661 + i, spo2=value, bpm=bpm[i], pi=pi).encode())
        log.write(f"{time.time():.6f} {i} {k} {dt} {value} {pi}\n")
        counts[i] += 1
        i += 1
        if i == a.n:
            i, k = 0, k + 1
    cleanup(links, masters, slaves, log, counts)


def cleanup(links: list[str], masters: list[int], slaves: list[int], log: TextIO | None, counts: list[int]) -> None:
    if log:
        log.close()
    time.sleep(0.2)  # let the reader drain the last lines before hang-up
    for link in links:
        if os.path.islink(link):
            os.unlink(link)
    for fd in masters + slaves:
        os.close(fd)
    print(f"feeder: wrote {sum(counts)} lines ({min(counts)}..{max(counts)} per device)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
