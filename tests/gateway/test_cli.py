"""The CLI as engineers use it: decode captures (raw or hex), list models, print the schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

VECTORS = Path(__file__).parent.parent / "vectors"


def run_cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], input=stdin, capture_output=True, check=False, timeout=60
    )


def events(out: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.decode().splitlines()]


def test_decode_sample_file_gives_the_real_values() -> None:
    # The sample file ends lines in LF (the notes say so) and holds comment lines: both must be handled.
    result = run_cli("decode", "--model", "masimo-ascii1", str(VECTORS / "masimo_ascii1_samples.txt"))
    assert result.returncode == 0, result.stderr
    evs = events(result.stdout)
    readings = [e for e in evs if e["type"] == "reading"]
    assert readings[0]["metrics"] == {"spo2": 98, "pulse_rate": 97, "perfusion_index": 3.6}
    assert readings[1]["metrics"] == {"spo2": 98, "pulse_rate": 96, "perfusion_index": 3.95}
    assert readings[0]["device_time"] == "2016-02-22T22:47:45"
    # Comment lines, the edited [C] line and the TrendCom lines are not ASCII 1 records.
    errors = [e for e in evs if e["type"] == "protocol_error"]
    assert len(errors) >= 8 + 10
    assert not any(r["metrics"].get("spo2") == 97 and r["metrics"].get("pulse_rate") == 69 for r in readings)
    assert b"reading(s)" in result.stderr


def test_decode_reads_stdin_and_hex_dumps() -> None:
    line = b"02/22/16 22:47:45 SN=0000056661 SPO2=098% BPM=097 PI=03.60% SPCO=--.-% SPMET=--.-% DESAT=-- PIDELTA=+-- ALARM=0000 EXC=000800\r\n"
    raw = run_cli("decode", "--model", "masimo-ascii1", stdin=line)
    dump = " ".join(f"{b:02X}" for b in line).encode()
    hexed = run_cli("decode", "--model", "masimo-ascii1", "--hex", stdin=dump)
    assert raw.returncode == hexed.returncode == 0
    assert events(raw.stdout) == events(hexed.stdout)
    assert [e["type"] for e in events(raw.stdout)] == ["status", "reading"]


def test_decode_garbage_gives_protocol_errors_never_readings() -> None:
    garbage = (
        bytes(range(256)) * 4
        + b"\r\nSPO2=099% BPM=060\r\n02/30/16 10:00:00 SPO2=099% BPM=060 ALARM=0000 EXC=000800\r\n"
    )
    result = run_cli("decode", "--model", "masimo-ascii1", stdin=garbage)
    assert result.returncode == 0
    evs = events(result.stdout)
    assert evs and all(e["type"] == "protocol_error" for e in evs)


def test_decode_bad_hex_is_a_clear_error() -> None:
    result = run_cli("decode", "--model", "masimo-ascii1", "--hex", stdin=b"01 E0 zz\n")
    assert result.returncode == 2
    assert b"not a hex dump line" in result.stderr


def test_models_lists_every_model_with_its_devices() -> None:
    result = run_cli("models")
    assert result.returncode == 0
    assert b"masimo-ascii1" in result.stdout and b"Rad-8" in result.stdout


def test_schema_is_valid_json_with_every_payload_and_the_docs_copy_is_current() -> None:
    result = run_cli("schema")
    doc = json.loads(result.stdout)
    assert {"ReadingMessage", "StatusMessage", "GatewayStatusMessage"} <= set(doc["$defs"])
    committed = json.loads((VECTORS.parent.parent / "docs" / "mqtt-schema.json").read_text())
    assert committed == doc, "docs/mqtt-schema.json is stale: run `make schema`"


def test_dashboards_build_follows_the_config_profile(tmp_path: Path) -> None:
    config = tmp_path / "gw.toml"
    config.write_text(
        '[influx]\napi = "v1"\ndatabase = "x"\n[alarms]\nprofile = "site"\n'
        '[[alarms.rules]]\nid = "spo2-low"\nmetric = "spo2"\nbelow = 93\npriority = "high"\n'
    )
    result = run_cli("dashboards", "build", "--config", str(config), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    wall = json.loads((tmp_path / "out" / "infusion-wall.json").read_text())
    assert '"value": 93' in json.dumps(wall).replace("93.0", "93")
    assert run_cli("dashboards", "push").returncode == 2  # no URL or token: a clear refusal


def test_the_run_import_path_leaves_the_terminal_and_notification_libraries_out() -> None:
    """`run` imports the CLI (every subcommand's parser) and the gateway; what only `watch`, the room commands or a
    configured [notify] need stays out of the running gateway's memory (issue 19: its RSS), and so do
    pydantic-settings (the config reads its INFUSION_* overrides itself) and aiohttp with what comes with it (the
    InfluxDB sink and the clock check speak HTTP through http.client: aiohttp was about 10 MiB)."""
    left_out = ("rich", "apprise", "clients", "pydantic_settings", "dotenv", "aiohttp", "yarl", "multidict")
    code = (
        "import sys\n"
        "import gateway.cli, gateway.app\n"
        "gateway.cli.build_parser()\n"
        f"print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in {left_out!r})))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, timeout=60)
    assert result.stdout.decode().split() == ["clients", "clients.room"]
