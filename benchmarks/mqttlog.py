"""The side-by-side benchmark's counter: `python -m benchmarks.mqttlog PORT LOG TOPIC...`.

One process, the same for the peer and the gateway, subscribed at QoS 1: it writes every non-empty message as
"<time.time() on arrival> <topic> <payload>" (the payload is one line of JSON on both sides) to LOG, the role
`mosquitto_sub -F '%U %t %p'` played in the peer's own harness (mosquitto-clients is not installed by `make services`).
Its clock is the feeder's (time.time()), so a line's write and its arrival can be subtracted. Plain paho, not the
gateway's MQTT code, so that what counts the gateway does not depend on it. Prints "ready" once subscribed; SIGTERM
flushes the log and ends it; the log is flushed every 0.2 s meanwhile (the benchmark reads it to see the
side ready and drained).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def run(port: int, log_path: str, topics: list[str]) -> None:
    log = open(log_path, "wb", buffering=1 << 16)  # noqa: SIM115 (closed in the finally below)
    now = time.time
    write = log.write

    def on_connect(client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            raise RuntimeError(f"counter: the broker refused the connection: {reason}")
        client.subscribe([(t, 1) for t in topics])

    def on_subscribe(_c: mqtt.Client, _u: Any, _mid: int, codes: Any, _p: Any) -> None:
        if any(code.is_failure for code in codes):
            raise RuntimeError(f"counter: subscription refused: {codes}")
        print("ready", flush=True)

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.payload:
            write(b"%.6f %s %s\n" % (now(), msg.topic.encode(), msg.payload))

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-counter-{time.time_ns()}", clean_session=True)
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message

    stopping = threading.Event()

    def stop(_sig: int, _frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        client.connect("127.0.0.1", port, keepalive=60)
        # The network thread writes; this one flushes, so the log is readable while it runs.
        network = threading.Thread(target=client.loop_forever, name="counter-mqtt", daemon=True)
        network.start()
        while not stopping.wait(0.2):
            if not network.is_alive():  # an exception in a callback (printed by the thread) or a lost broker
                raise RuntimeError("counter: the MQTT loop ended before it was stopped")
            log.flush()
        client.disconnect()
        network.join(timeout=5)
    finally:
        log.close()


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    run(int(sys.argv[1]), sys.argv[2], sys.argv[3:])
