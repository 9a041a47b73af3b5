"""`make bench`: every benchmark in one run on this machine; prints a table and writes benchmarks/results/*.json.

Figures, not tests: nothing here passes or fails. Each gateway figure is set against the raw limit measured in the
same run, and against the peer (the Node-RED flow in benchmarks/peer/) only in the side-by-side table, where both ran
alternately in this same run (benchmarks/sidebyside.py): no figure of another run or machine is divided by.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import decode, delays, drain, latency, limits, load, mixed, notify_delay, sidebyside


def _tmp() -> Path:
    return Path(tempfile.mkdtemp(prefix="bench-"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter windows (a smoke run, not figures to publish)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--side-by-side-only", action="store_true", help="only the side-by-side table (about 40 min; --quick: 12)"
    )
    args = parser.parse_args()
    window = 10 if args.quick else 30
    results: dict[str, Any] = {
        "machine": {
            "cpus": len(__import__("os").sched_getaffinity(0)),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # First, while the machine is as quiet as it will be: the peer and the gateway alternately, ratios of this run.
    results["sidebyside"] = side = sidebyside.run_cli(args.quick, None, 3, [100, 200], 1000)
    if args.side_by_side_only:
        _write(args.out, results)
        return
    print("decode throughput")
    results["decode"] = decode.run()
    for row in results["decode"]:
        print(f"  {row['model']:20} {row['frames_per_s']:>9} frames/s {row['mb_per_s']:>6} MB/s")
    print("decoding cost: CPU s per MB (bytes examined per byte fed), 1-byte and 4 KiB reads")
    print("  " + decode.table(results["decode"]).replace("\n", "\n  "))

    print("raw limits")
    results["limits"] = lim = asyncio.run(limits.measure(_tmp()))
    for key, value in lim.items():
        print(f"  {key:40} {value:>10}")

    print("gateway under load (Masimo ASCII 1, 1 line/s each)")
    results["load"] = []
    for n in (10, 50, 100, 200):
        row = asyncio.run(load.measure(_tmp(), [(str(i), "oximeter", "masimo-ascii1") for i in range(n)], 5, window))
        row["mqtt_share_of_limit"] = round(n / lim["mqtt_qos1_sequential_per_s"], 4)
        results["load"].append(row)
        print(
            f"  N={n:3}: gateway {row['gateway_cpu_pct']:5}% CPU, "
            f"RSS {row['gateway_rss_mb_steady']} MB steady / {row['gateway_rss_mb_peak']} peak, "
            f"influxd {row['influxd_cpu_pct']}%, mosquitto {row['mosquitto_cpu_pct']}%, "
            f"counted {row['on_mqtt']}/{row['lines_sent']} MQTT {row['in_influx']}/{row['lines_sent']} InfluxDB"
        )
    print("mixed rooms at their real rates (Masimo, Nonin DF2, Nonin DF8, Contec, SunTech cuff per room)")
    results["mixed"] = row = asyncio.run(mixed.measure(_tmp(), 4, 10, window))
    print(
        f"  {row['rooms']} rooms, {row['devices']} devices, {row['wire_frames_per_s']} frames/s on the wire: "
        f"gateway {row['gateway_cpu_pct']}% CPU, RSS {row['gateway_rss_mb_steady']} MB; "
        f"{row['readings_published']} readings published, {row['readings_in_influx']} in InfluxDB, "
        f"{row['nibp_results']} blood pressures"
    )
    print("latency: pty write of the frame's last byte -> MQTT subscriber (durable first)")
    print(f"  floor (bare relay, no decode, no durability): p50 {lim['relay_latency_p50_ms']} ms, "
          f"p99 {lim['relay_latency_p99_ms']} ms")  # fmt: skip
    results["latency"] = []
    for burst in (False, True):
        for n in (10, 100):
            row = asyncio.run(latency.measure(_tmp(), n, window if not burst else window * 2 / 3, burst))
            for kind in ("reading", "alarm"):
                row[kind]["p99_vs_floor"] = round(row[kind]["p99_ms"] / lim["relay_latency_p99_ms"], 1)
            results["latency"].append(row)
            print(f"  N={n:3} {row['mode']:6}: reading {row['reading']}  alarm {row['alarm']}")
    print("disclosed delays (default config, example profile; seconds, p50 / max over 5 rooms; docs/alarms.md)")
    results["delays"] = row = asyncio.run(delays.measure(_tmp(), 5))
    print("  " + delays.table(row).replace("\n", "\n  "))
    print("notification delay (a desaturation on a pty -> the ALARM message at a json:// receiver; docs/alarms.md)")
    results["notify_delay"] = row = asyncio.run(notify_delay.measure(_tmp(), 5, 3 if args.quick else 10))
    print("  " + notify_delay.table(row).replace("\n", "\n  "))
    print("backlog drain (50,000 readings owed, 10 live devices)")
    results["drain"] = row = asyncio.run(drain.measure(_tmp(), 50_000, 10))
    influx_share = round(row["influx_readings_per_s"] / lim["influx_points_per_s_batched_5000"], 3)
    print(
        f"  InfluxDB {row['influx_readings_per_s']} readings/s ({influx_share} of the raw batched limit), "
        f"MQTT {row['mqtt_readings_per_s']} readings/s "
        f"({round(row['mqtt_readings_per_s'] / lim['mqtt_qos1_100_in_flight_per_s'], 3)} of the raw limit), "
        f"live meanwhile {row['live_during_drain']} "
        f"(while InfluxDB drains {row['live_while_influx_drains']}, after {row['live_after_influx_drained']})"
    )
    print("the side-by-side table again (measured first in this run):")
    print(sidebyside.report(side))
    _write(args.out, results)


def _write(out: Path, results: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench-{results['started'].replace(':', '')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
