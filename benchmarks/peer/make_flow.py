#!/usr/bin/env python3
"""Write a Node-RED flow for N serial ports from flow-template.json (stdlib only).

  make_flow.py --mqtt 127.0.0.1:18830 --influx 127.0.0.1:18086 -o flows.json /tmp/nodered-work/tty0 ...

Each PATH (or PATH=DEVICE, or PATH=DEVICE@ROOM) gets its own serial-port config node + serial-in node (9600 8N1,
split on \\n), all wired to one "parse" function node (parse_masimo.js). Device ids default to pox000, pox001, ...;
rooms to --room. Topics: <prefix>/<room>/<device>/vitals for readings, <prefix>/<room>/alerts for SpO2 alerts
(the alert's room is set from the reading by a change node, so one flow serves one room or many).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def hostport(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host or "127.0.0.1", int(port)


def build_flow(
    devices: list[tuple[str, str, str]],
    mqtt: tuple[str, int],
    influx: tuple[str, int],
    db: str = "vitals",
    prefix: str = "nodered",
    spo2_low: int = 90,
) -> list[dict[str, Any]]:
    """devices: (serial path, device id, room). The flow as Node-RED's flows.json holds it."""
    table = {
        path: {"device": dev, "room": room, "topic": f"{prefix}/{room}/{dev}/vitals"} for path, dev, room in devices
    }
    with open(os.path.join(HERE, "parse_masimo.js")) as f:
        func = f.read()
    subst = {
        "__MQTT_HOST__": mqtt[0],
        "__MQTT_PORT__": str(mqtt[1]),
        "__INFLUX_HOST__": influx[0],
        "__INFLUX_PORT__": str(influx[1]),
        "__INFLUX_DB__": db,
        "__SPO2_LOW__": str(spo2_low),
        "__PREFIX__": prefix,
        "__FUNC__": func,
        "__DEVICES__": json.dumps(table),
    }

    def fill(node: Any, extra: dict[str, str] | None = None) -> Any:
        """Replace the __PLACEHOLDERS__ in every string of a node (nested too)."""
        values = dict(subst, **(extra or {}))

        def sub(v: Any) -> Any:
            if isinstance(v, str):
                for ph, val in values.items():
                    v = v.replace(ph, val)
            elif isinstance(v, dict):
                v = {k: sub(x) for k, x in v.items()}
            elif isinstance(v, list):
                v = [sub(x) for x in v]
            return v

        return sub(node)

    with open(os.path.join(HERE, "flow-template.json")) as f:
        template: list[dict[str, Any]] = json.load(f)
    flow = [fill(n) for n in template if not n["id"].endswith("-TEMPLATE")]
    port_t, in_t = (next(n for n in template if n["id"] == f"{p}-TEMPLATE") for p in ("serial-port", "serial-in"))
    for i, (path, dev, _room) in enumerate(devices):
        port = fill(copy.deepcopy(port_t), {"__PATH__": path, "__DEVICE__": dev})
        port["id"] = f"serial-port-{i}"
        sin = fill(copy.deepcopy(in_t), {"__DEVICE__": dev})
        sin.update(id=f"serial-in-{i}", serial=port["id"], y=in_t["y"] + 40 * i)
        flow += [port, sin]
    return flow


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("paths", nargs="+", metavar="PATH[=DEVICE[@ROOM]]")
    ap.add_argument("--mqtt", type=hostport, default=("127.0.0.1", 1883), metavar="HOST:PORT")
    ap.add_argument("--influx", type=hostport, default=("127.0.0.1", 8086), metavar="HOST:PORT")
    ap.add_argument("--db", default="vitals", help="InfluxDB 1.x database")
    ap.add_argument("--room", default="room1", help="room of every PATH that names none")
    ap.add_argument("--prefix", default="nodered", help="MQTT topic prefix")
    ap.add_argument("--spo2-low", type=int, default=90, help="alert when SpO2 < this")
    ap.add_argument("-o", "--out", default="-", help="output file (default: stdout)")
    a = ap.parse_args()

    devices = []
    for i, arg in enumerate(a.paths):
        path, _, rest = arg.partition("=")
        dev, _, room = rest.partition("@")
        devices.append((path, dev or f"pox{i:03d}", room or a.room))
    text = json.dumps(build_flow(devices, a.mqtt, a.influx, a.db, a.prefix, a.spo2_low), indent=1)
    if a.out == "-":
        print(text)
    else:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
