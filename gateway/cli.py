"""`infusion-telemetry`: run the gateway, check a config, decode captures, simulate devices, watch the wall."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import logging
import os
import re
import resource
import signal
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from clients.room import cmd_ack, cmd_session, cmd_standby, parse_duration
from devices.base import event_to_dict
from devices.registry import MODELS, get_model
from gateway.config import ConfigError, RedactingFilter, load_config
from gateway.preflight import EXIT_CONFIG, EXIT_INTERNAL, EXIT_OK, Fatal, preflight, storage_fatal

log = logging.getLogger("infusion-telemetry")


def setup_logging(level: str) -> None:
    logging.Formatter.converter = time.gmtime  # UTC everywhere; zone-less local times shift graphs by hours
    logging.basicConfig(
        level=level,
        format="%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:  # every record, from any library: no secret, no URL userinfo
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


# --- check-config ----------------------------------------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.file)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(json.dumps(cfg.redacted(), indent=2, default=str))
    print(f"{args.file}: OK ({len(cfg.devices)} device(s))", file=sys.stderr)
    return 0


# --- models / decode ---------------------------------------------------------------------------------------------


def cmd_models(args: argparse.Namespace) -> int:
    for model_id, model in sorted(MODELS.items()):
        spec = model.spec
        s = spec.serial
        line = f"{s.baudrate} {s.bytesize}{s.parity}{s.stopbits:g}"
        print(f"{model_id:20} {spec.kind:15} {line:10} {', '.join(spec.serves)}")
    return 0


GC_THRESHOLD_0 = 10_000  # young-generation threshold in the gateway process (Python's default: 700)


def tune_runtime() -> None:
    """The interpreter settings of a running gateway, in one place (docs/benchmarks.md measured each)."""
    # While a backlog drains, the outbox thread and InfluxDB's line rendering hold the GIL for long stretches; the
    # default 5 ms switch interval would add that much, several times over, to every live reading on the loop.
    sys.setswitchinterval(0.0001)
    # A backlog batch keeps thousands of decoded records alive at once; with the default thresholds they are promoted
    # into the old generation and full collections (up to 50 ms, all threads stopped) land on live readings. Records
    # hold no reference cycles, so collections can be rarer; what start-up made is frozen out of every scan.
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD_0, 10, 10)


FDS_BESIDE_PORTS = 256  # sockets, the outbox's files, the renderer's pipes, logs: beside a descriptor per port


def raise_open_files_limit(ports: int) -> int:
    """Raise the soft limit on open descriptors to the hard one (the systemd unit sets both with LimitNOFILE; a shell
    often starts at 1,024): a site gateway holds one per port and more. Says so loudly when even the hard limit
    leaves too few for the configured ports. Returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open files limit from %d to %d: %s", soft, want, exc)
    need = ports + FDS_BESIDE_PORTS
    if soft != resource.RLIM_INFINITY and soft < need:
        log.error(
            "open files limit %d is below the %d that %d ports need: raise LimitNOFILE (systemd) or ulimit -n",
            soft,
            need,
            ports,
        )
    return soft


HEX_TOKEN = re.compile(r"(?:0x)?([0-9a-fA-F]{2})")


def parse_hex_dump(text: str) -> bytes:
    """Accept `01 E0 84`, `01e084`, `0x01,0xE0` and hexdump -C style lines (offset and ASCII column ignored)."""
    out = bytearray()
    for raw_line in text.splitlines():
        line = raw_line.split("#", 1)[0]
        line = re.sub(r"\|.*\|\s*$", "", line)  # hexdump -C ASCII column
        line = re.sub(r"^\s*[0-9a-fA-F]{6,}[:\s]", "", line)  # leading offset
        compact = re.sub(r"[\s,:;]|0x", "", line, flags=re.IGNORECASE)
        if not compact:
            continue
        if len(compact) % 2 or not re.fullmatch(r"[0-9a-fA-F]*", compact):
            raise ValueError(f"not a hex dump line: {raw_line.strip()!r}")
        out += bytes.fromhex(compact)
    return bytes(out)


def _read_chunks(stream: BinaryIO) -> Iterator[bytes]:
    while chunk := stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536):
        yield chunk


def cmd_decode(args: argparse.Namespace) -> int:
    driver = get_model(args.model).driver()
    stream: BinaryIO = args.file.open("rb") if args.file else sys.stdin.buffer
    counts = {"reading": 0, "status": 0, "protocol_error": 0, "waveform": 0}
    with stream:
        chunks: Iterator[bytes]
        if args.hex:
            try:
                chunks = iter([parse_hex_dump(stream.read().decode("ascii", "replace"))])
            except ValueError as exc:
                print(f"decode: {exc}", file=sys.stderr)
                return 2
        else:
            chunks = _read_chunks(stream)
        events = (event for chunk in chunks for event in driver.feed(chunk, time.time()))
        for event in itertools.chain(events, driver.flush()):
            out = event_to_dict(event)
            counts[out["type"]] += 1
            print(json.dumps(out))
    print(
        f"decode: {counts['reading']} reading(s), {counts['status']} status change(s), "
        f"{counts['protocol_error']} protocol error(s)",
        file=sys.stderr,
    )
    return 0


# --- run ---------------------------------------------------------------------------------------------------------


def _fatal(exc: Fatal) -> int:
    log.critical("fatal: %s (exit %d)", exc.message, exc.code)
    return exc.code


def cmd_run(args: argparse.Namespace) -> int:
    """Exit codes (README, "Exit codes"): 0 clean stop, 1 internal error, 2 configuration, 3 storage."""
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(cfg.gateway.log_level)
    try:
        preflight(cfg)  # secrets and the data directory, before any port opens
    except Fatal as exc:
        return _fatal(exc)
    from gateway.app import Gateway

    tune_runtime()
    raise_open_files_limit(len(cfg.devices))

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Gateway(cfg).run(stop)

    outbox = cfg.gateway.data_dir / "outbox.sqlite3"
    try:
        asyncio.run(main())
    except Fatal as exc:  # a gateway task failed: Gateway.run says what it means
        return _fatal(exc)
    except ConfigError as exc:
        return _fatal(Fatal(EXIT_CONFIG, "; ".join(exc.problems)))
    except (sqlite3.Error, OSError) as exc:  # opening, flushing or closing the outbox (Gateway.run's own steps)
        return _fatal(storage_fatal(outbox, exc))
    except Exception as exc:
        log.critical("fatal: internal error %r (exit %d)", exc, EXIT_INTERNAL, exc_info=True)
        return EXIT_INTERNAL
    return EXIT_OK


# --- simulate ----------------------------------------------------------------------------------------------------


def cmd_simulate(args: argparse.Namespace) -> int:
    from simulators.scenarios import ScenarioError, load_scenario
    from simulators.serve import serve

    if args.room:
        if args.no_pty and args.tcp_base is None:
            print("simulate: --no-pty needs --tcp-base", file=sys.stderr)
            return 2
        return _simulate_rooms(args)
    if args.model is None:
        print("simulate: give --model MODEL (one device) or --room N (a whole room)", file=sys.stderr)
        return 2
    if not (args.pty or args.tcp is not None or args.stdout):
        print("simulate: choose where to serve: --pty, --tcp PORT or --stdout", file=sys.stderr)
        return 2
    if args.link is not None and not args.pty:
        print("simulate: --link needs --pty", file=sys.stderr)
        return 2
    try:
        scenario = load_scenario(args.scenario)
    except (ScenarioError, OSError) as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 2

    def ready(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            serve(
                args.model,
                scenario,
                pty=args.pty,
                link=args.link,
                tcp_port=args.tcp,
                stdout=args.stdout,
                speed=args.speed,
                duration_s=args.duration,
                seed=args.seed,
                on_ready=ready,
            )
        )
    return 0


def _simulate_rooms(args: argparse.Namespace) -> int:
    from simulators.scenarios import ScenarioError, load_scenario
    from simulators.serve import DEFAULT_ROOM, RoomDevice, serve_room

    devices = DEFAULT_ROOM
    if args.model is not None:  # --model picks the oximeter of the room
        devices = (RoomDevice("oximeter", args.model), *DEFAULT_ROOM[1:])
    try:
        scenario = load_scenario(args.scenario)
    except (ScenarioError, OSError) as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 2

    async def rooms() -> None:
        async with asyncio.TaskGroup() as group:
            for i, room in enumerate(args.room):
                group.create_task(
                    serve_room(
                        room,
                        scenario,
                        args.link_dir,
                        devices=devices,
                        speed=args.speed,
                        duration_s=args.duration,
                        seed=args.seed + 100 * i,
                        on_ready=lambda line: print(line, file=sys.stderr, flush=True),
                        pty=not args.no_pty,
                        tcp_port_base=None if args.tcp_base is None else args.tcp_base + 10 * i,
                        tcp_host=args.tcp_host,
                    )
                )

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(rooms())
    return 0


# --- watch / demo / schema ---------------------------------------------------------------------------------------


def cmd_watch(args: argparse.Namespace) -> int:
    from clients.watch import watch_main

    return watch_main(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from devtools.demo import demo_main

    return demo_main(args)


def cmd_dashboards(args: argparse.Namespace) -> int:
    from dashboards.build import GENERATED_DIR
    from dashboards.push import main_build, main_push

    if args.action == "build":
        return main_build(args.config, args.out or GENERATED_DIR)
    token = args.token or os.environ.get("GRAFANA_TOKEN")
    if not args.url or not token:
        print("dashboards push: give --url and --token (or GRAFANA_TOKEN in the environment)", file=sys.stderr)
        return 2
    return main_push(args.config, args.url, token)


def cmd_schema(args: argparse.Namespace) -> int:
    from gateway.envelope import schema_document

    print(json.dumps(schema_document(), indent=2))
    return 0


# --- parser ------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infusion-telemetry",
        description="Infusion room telemetry gateway: serial pulse oximeters and NIBP cuffs to MQTT and InfluxDB.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the gateway")
    run.add_argument("--config", "-c", type=Path, required=True)
    run.set_defaults(func=cmd_run)

    chk = sub.add_parser("check-config", help="validate a config file and print it (secrets redacted)")
    chk.add_argument("file", type=Path)
    chk.set_defaults(func=cmd_check_config)

    dec = sub.add_parser("decode", help="decode a captured serial log into JSON lines")
    dec.add_argument("--model", "-m", required=True, choices=sorted(MODELS))
    dec.add_argument("--hex", action="store_true", help="the input is a hex dump, not raw bytes")
    dec.add_argument("file", type=Path, nargs="?", help="capture file (default: stdin)")
    dec.set_defaults(func=cmd_decode)

    mod = sub.add_parser("models", help="list the supported device models")
    mod.set_defaults(func=cmd_models)

    sim = sub.add_parser("simulate", help="serve a model's exact byte stream on a pty, TCP or stdout")
    sim.add_argument("--model", "-m", choices=sorted(MODELS), help="the model to serve (with --room: the oximeter)")
    sim.add_argument(
        "--room",
        action="append",
        metavar="N",
        help="serve a whole room (oximeter and cuff) on ptys; repeat for more rooms",
    )
    sim.add_argument(
        "--tcp-base",
        type=int,
        metavar="PORT",
        help="with --room: also serve device j of the i-th room on TCP port PORT + 10*i + j",
    )
    sim.add_argument("--no-pty", action="store_true", help="with --room --tcp-base: TCP only")
    sim.add_argument("--tcp-host", default="127.0.0.1", help="address TCP serving binds (0.0.0.0 in a container)")
    sim.add_argument(
        "--link-dir",
        type=Path,
        default=Path("/tmp/infusion-sim"),
        help="with --room: links go to DIR/room-N/{oximeter,cuff}",
    )
    sim.add_argument("--scenario", default="baseline", help="scenario name or TOML file (default: baseline)")
    sim.add_argument("--pty", action="store_true", help="open a pseudo-terminal and print its path")
    sim.add_argument("--link", type=Path, help="with --pty: also make this symlink to it (like udev)")
    sim.add_argument("--tcp", type=int, metavar="PORT", help="serve as a TCP serial server (socket://)")
    sim.add_argument("--stdout", action="store_true", help="write the bytes to stdout")
    sim.add_argument("--speed", type=float, default=1.0, help="time acceleration (default 1 = real time)")
    sim.add_argument("--duration", type=float, help="stop after this many scenario seconds")
    sim.add_argument("--seed", type=int, default=1)
    sim.set_defaults(func=cmd_simulate)

    wat = sub.add_parser("watch", help="live terminal wall of all rooms, from MQTT")
    wat.add_argument("--config", "-c", type=Path, help="gateway config (broker and site); or --host/--port")
    wat.add_argument("--host", default=None)
    wat.add_argument("--port", type=int, default=None)
    wat.add_argument("--site", default=None)
    wat.add_argument("--prefix", default=None)
    wat.add_argument("--username", help="broker account (a reader), not the gateway's")
    wat_secret = wat.add_mutually_exclusive_group()
    wat_secret.add_argument("--password-env", metavar="VAR", help="the account's password is in this variable")
    wat_secret.add_argument("--password-file", type=Path, metavar="FILE", help="the account's password file")
    wat.add_argument("--once", type=float, metavar="SECONDS", help="collect for SECONDS, print the wall, exit")
    wat.set_defaults(func=cmd_watch)

    demo = sub.add_parser("demo", help="local broker, database, three simulated rooms, gateway and watch")
    demo.add_argument("--workdir", type=Path, help="where services keep their data (default: a temp dir)")
    demo.add_argument("--duration", type=float, help="stop after this many seconds (default: until Ctrl-C)")
    demo.set_defaults(func=cmd_demo)

    def broker_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--config", "-c", type=Path, help="gateway config (broker and site); or --host/--port")
        parser.add_argument("--host", default=None)
        parser.add_argument("--port", type=int, default=None)
        parser.add_argument("--site", default=None)
        parser.add_argument("--prefix", default=None)
        parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the gateway's reply")
        login_args(parser)

    def login_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--username", help="broker account (a nurse station or reader), not the gateway's")
        secret = parser.add_mutually_exclusive_group()
        secret.add_argument("--password-env", metavar="VAR", help="the account's password is in this variable")
        secret.add_argument("--password-file", type=Path, metavar="FILE", help="the account's password file")

    ses = sub.add_parser("session", help="start or stop a room's infusion session (the baseline for relative alarms)")
    ses.add_argument("action", choices=["start", "stop"])
    ses.add_argument("--room", required=True)
    ses.add_argument("--role", required=True, help="operator role (nurse, physician): never a name")
    broker_args(ses)
    ses.set_defaults(func=cmd_session)

    ack = sub.add_parser("ack", help="acknowledge (or --silence) an active alarm")
    ack.add_argument("--room", required=True)
    ack.add_argument("--alarm", required=True, help="the alarm id, room/device/rule, as the wall and MQTT show it")
    ack.add_argument("--role", required=True, help="operator role (nurse, physician): never a name")
    ack.add_argument("--silence", type=float, metavar="SECONDS", help="silence for this long instead of acknowledging")
    broker_args(ack)
    ack.set_defaults(func=cmd_ack)

    sby = sub.add_parser(
        "standby", help="say nobody is monitored in a room: its patient and device alarms are suspended, shown STANDBY"
    )
    sby.add_argument("--room", required=True)
    sby.add_argument(
        "--for",
        dest="duration",
        type=parse_duration,
        default=None,
        metavar="DURATION",
        help="ends on its own after this long (90s, 45m, 2h; default 4h, at most 24h)",
    )
    sby.add_argument("--end", action="store_true", help="end standby now: the room is monitored again")
    sby.add_argument("--role", required=True, help="operator role (nurse, physician): never a name")
    broker_args(sby)
    sby.set_defaults(func=cmd_standby)

    dash = sub.add_parser("dashboards", help="build the Grafana dashboards for a site's alarm profile, or push them")
    dash.add_argument("action", choices=["build", "push"])
    dash.add_argument("--config", "-c", type=Path, help="gateway config whose [alarms] colour the dashboards")
    dash.add_argument("--out", type=Path, help="build: where the JSON goes (default: dashboards/generated)")
    dash.add_argument("--url", help="push: the Grafana URL")
    dash.add_argument("--token", help="push: a Grafana service-account token (or GRAFANA_TOKEN)")
    dash.set_defaults(func=cmd_dashboards)

    sch = sub.add_parser("schema", help="print the JSON Schema of the MQTT payloads")
    sch.set_defaults(func=cmd_schema)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("run",):
        setup_logging("WARNING")
    try:
        code: int = args.func(args)
    except BrokenPipeError:  # `decode ... | head` is normal use
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
