"""The room commands a nurse station sends over MQTT (`session`, `ack`, `standby`): one request, one reply.

They log in with their own broker account (never the gateway's), so the broker's ACL decides who may command.
The CLI's parser imports this module for every command, `run` included: what a command needs (the watch's login
helpers, and rich under them) is imported when one is sent, so the running gateway never loads it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid

from gateway.config import ConfigError


def _room_command(args: argparse.Namespace, **fields: object) -> int:
    from clients.watch import mqtt_from_args
    from gateway.commands import command_payload
    from gateway.sinks.mqtt import BrokerError, request

    try:
        mqtt, site = mqtt_from_args(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if site == "+":
        print(f"{args.command}: give --site or --config", file=sys.stderr)
        return 2
    command_id = uuid.uuid4().hex[:12]
    topic = f"{mqtt.topic_prefix}/{site}/{args.room}/command"
    payload = command_payload(id=command_id, **{k: v for k, v in fields.items() if v is not None})
    try:
        reply = json.loads(asyncio.run(request(mqtt, topic, payload, command_id, args.timeout)))
    except TimeoutError:
        print(f"{args.command}: no reply from a gateway within {args.timeout:g} s on {topic}", file=sys.stderr)
        return 1
    except BrokerError as exc:
        print(f"{args.command}: cannot reach the MQTT broker at {mqtt.host}:{mqtt.port}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(reply))
    return 0 if reply.get("ok") else 1


def cmd_session(args: argparse.Namespace) -> int:
    return _room_command(args, action=f"{args.action}_session", operator_role=args.role)


def cmd_ack(args: argparse.Namespace) -> int:
    action = "silence" if args.silence else "acknowledge"
    return _room_command(args, action=action, alarm_id=args.alarm, operator_role=args.role, silence_s=args.silence)


def parse_duration(text: str) -> float:
    """`90s`, `45m`, `2h` or plain seconds: how long a room stays in standby."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    scale = units.get(text[-1:].lower(), 1.0)
    number = text[:-1] if text[-1:].lower() in units else text
    try:
        seconds = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 45m, 2h)") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"a duration must be positive: {text!r}")
    return seconds


def cmd_standby(args: argparse.Namespace) -> int:
    if args.end:
        return _room_command(args, action="end_standby", operator_role=args.role)
    return _room_command(args, action="standby", operator_role=args.role, standby_s=args.duration)
