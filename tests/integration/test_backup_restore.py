"""Backups restored: deploy/backup.sh takes a RUNNING gateway's outbox and a running influxd (1.6, `influxd backup
-portable`), both are destroyed, deploy/restore.sh brings them back, and every reading is counted.

The broker is down while the backup is taken, so the outbox holds every record (nothing is acknowledged by both sinks,
nothing pruned): its backup is the MQTT backlog a lost disk would take with it. InfluxDB gets the readings live. The
device keeps talking while the backup runs, so the outbox is written to during the copy. Afterwards:
- InfluxDB: every reading stored before the backup is there again, exactly once, and nothing it never had;
- the outbox: a consistent snapshot (records 1..K exactly as the live outbox had them, no gap, nothing torn);
- the gateway started on the restored outbox sends every restored reading to the broker (counted by device time),
  InfluxDB ends with each reading once, and new readings get sequence numbers above every one used before the loss
  (no id given twice: the data folder, outbox.seq included, was destroyed too);
- the backup is outside the data folder, 0700 with files 0600; the restored outbox 0600 in a 0700 folder.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.localservices import Influxd, InfluxError, Mosquitto, ServiceUnavailable
from gateway import storage
from tests.helpers import stop_gateway, wait_for
from tests.integration.test_gateway_e2e import write_config
from tests.integration.test_reliability import Device, Mqtt, start_gateway_logged, stored

REPO = Path(__file__).parent.parent.parent
BACKUP = REPO / "deploy" / "backup.sh"
RESTORE = REPO / "deploy" / "restore.sh"
KEY = "7/oximeter"


def run(script: Path, *args: str) -> str:
    """The script as IT runs it; its stderr on failure."""
    done = subprocess.run(
        ["bash", str(script), "--python", sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"{script.name} {' '.join(args)} failed ({done.returncode}):\n{done.stderr}"
    return done.stdout


def readings(outbox: Path) -> dict[int, tuple[int, str, str]]:
    """Outbox id -> (seq, device time, body) of every reading of the room's oximeter."""
    with sqlite3.connect(f"{outbox.as_uri()}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT id, seq, body FROM records WHERE key = ? AND type = 'reading'", (KEY,)).fetchall()
    return {i: (seq, json.loads(body)["device_time"], body) for i, seq, body in rows}


def records(outbox: Path) -> dict[int, str]:
    with sqlite3.connect(f"{outbox.as_uri()}?mode=ro", uri=True) as db:
        return dict(db.execute("SELECT id, body FROM records").fetchall())


def mode(path: Path) -> str:
    return oct(stat.S_IMODE(path.stat().st_mode))


async def test_backup_of_a_running_gateway_and_influxd_restored_after_both_are_destroyed(
    tmp_path: Path, influxd: Influxd, influx_db: str
) -> None:
    broker = Mosquitto(tmp_path / "mosquitto")  # its port is in the config; it starts only after the restore
    broker.persistence = True
    device = Device(tmp_path / "room7")
    config = write_config(tmp_path, broker.port, influxd.url, influx_db, device.link)
    data = tmp_path / "data"
    outbox = data / "outbox.sqlite3"
    dest = tmp_path / "backups"
    proc = start_gateway_logged(config)
    mqtt: Mqtt | None = None
    try:
        # The port is open once its "connected" status is committed (the broker is down: the outbox says it).
        def port_open() -> bool:
            try:
                with sqlite3.connect(f"{outbox.as_uri()}?mode=ro", uri=True) as db:
                    rows = db.execute("SELECT body FROM records WHERE type = 'status'").fetchall()
            except sqlite3.Error:
                return False
            return any(json.loads(body).get("state") == "connected" for (body,) in rows)

        await wait_for(port_open, 30)
        await device.send(3)
        before = set(device.sent)
        await wait_for(lambda: {d for d, _ in stored(influxd, influx_db)} >= before, 20)

        # The backup runs while the device talks and the gateway commits.
        talking = asyncio.create_task(device.send(2))
        await asyncio.sleep(0.5)
        args = ["--dest", str(dest), "--outbox", str(outbox), "--influx1", f"127.0.0.1:{influxd.rpc_port}"]
        printed = await asyncio.to_thread(run, BACKUP, *args, "--database", influx_db)
        out = Path(printed.strip().splitlines()[-1])
        await talking
        await wait_for(lambda: {r[1] for r in readings(outbox).values()} >= set(device.sent), 10)
    finally:
        stop_gateway(proc)
    truth_records = records(outbox)
    truth = readings(outbox)
    truth_influx = stored(influxd, influx_db)
    used = max(seq for seq, _, _ in truth.values())
    assert {d for _, d, _ in truth.values()} == set(device.sent), "the live outbox holds every reading"

    # The backup: outside the data folder, owner-only, and its manifest agrees with its copy.
    assert out.parent == dest and not out.is_relative_to(data)
    assert mode(out) == "0o700"
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"outbox.sqlite3", "outbox.seq", "MANIFEST", "SHA256SUMS"} <= {p.name for p in files}
    assert all(mode(p) == "0o600" for p in files), {p.name: mode(p) for p in files}
    manifest = dict(line.split("=", 1) for line in (out / "MANIFEST").read_text().splitlines())
    assert int(manifest["outbox_records"]) == len(records(out / "outbox.sqlite3"))

    # Both destroyed: InfluxDB's data and the gateway's whole data folder (outbox.seq with it).
    influxd.kill()
    shutil.rmtree(influxd.workdir / "data")
    shutil.rmtree(data)
    try:
        influxd.start()
    except ServiceUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    run(RESTORE, "--from", str(out), "--outbox", str(outbox), "--influx1", f"127.0.0.1:{influxd.rpc_port}")

    # InfluxDB: every reading it had before the backup, once. influxd reopens the restored shard a moment after
    # `influxd restore` returns (queries answer "engine is closed" meanwhile).
    def restored_influx() -> list[tuple[str, int]] | None:
        try:
            return stored(influxd, influx_db)
        except InfluxError:
            return None

    await wait_for(lambda: restored_influx() is not None, 10)
    rows = stored(influxd, influx_db)
    assert len(rows) == len({d for d, _ in rows}), "each reading once"
    assert {d for d, _ in rows} >= before, f"{len(before - {d for d, _ in rows})} readings lost in InfluxDB"
    assert set(rows) <= set(truth_influx), "InfluxDB restored with readings it never had"

    # The outbox: a consistent snapshot, records 1..K exactly as the live outbox had them.
    restored = records(outbox)
    last = max(restored)
    assert sorted(restored) == list(range(1, last + 1)), "a gap in the restored outbox"
    assert restored == {i: truth_records[i] for i in range(1, last + 1)}, "records differ from the live outbox's"
    assert len(restored) == int(manifest["outbox_records"])
    kept = readings(outbox)
    assert {d for _, d, _ in kept.values()} >= before, "readings committed before the backup are in it"
    assert mode(outbox) == "0o600" and mode(data) == "0o700"

    # The gateway on the restored outbox: the backlog reaches the broker, InfluxDB ends with each reading once, and
    # new readings get numbers above every one used before the loss.
    try:
        broker.start()
    except ServiceUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    mqtt = Mqtt(broker.port)
    proc = start_gateway_logged(config)
    try:
        await wait_for(lambda: mqtt.connects >= 1, 30)
        expected = {d for _, d, _ in kept.values()}
        await wait_for(lambda: mqtt.device_times() >= expected, 30)
        sent_before = len(device.sent)
        await device.send(1)
        new = set(device.sent[sent_before:])
        await wait_for(lambda: mqtt.device_times() >= new, 15)
        fresh = [m for _, m in mqtt.readings if m["device_time"] in new]
        assert min(m["seq"] for m in fresh) > used, "a sequence number used before the loss was given again"
        want = {d for d, _ in rows} | expected | new
        await wait_for(lambda: {d for d, _ in stored(influxd, influx_db)} >= want, 20)
        final = stored(influxd, influx_db)
        assert len(final) == len({d for d, _ in final}) == len(want), "InfluxDB holds each reading once"
    finally:
        stop_gateway(proc)
        await mqtt.close()
        device.endpoint.close()
        broker.stop()


def test_backup_and_restore_keep_the_outbox_its_users_and_refuse_what_would_lose_data(tmp_path: Path) -> None:
    """Run as root (as IT does) on a stopped gateway's outbox, which has no -wal or -shm: neither script leaves a
    file the gateway's user cannot open (SQLite gives a side file it creates as root the database's owner). A backup
    inside the data folder is refused before anything is created there; a restore is refused while a process has
    the outbox open, and keeps the file it replaces."""
    data = tmp_path / "data"
    outbox = data / "outbox.sqlite3"
    db, _marks, _report = storage.open_outbox(outbox, ("mqtt", "influx"))
    with storage.transaction(db):
        db.execute("INSERT INTO records(key, seq, type, body, created) VALUES (?, 5, 'reading', '{}', 0)", (KEY,))
        db.execute("INSERT INTO sequences(key, seq) VALUES (?, 5)", (KEY,))
    db.close()
    assert not Path(f"{outbox}-wal").exists()
    user = 65534 if os.geteuid() == 0 else os.geteuid()  # as root: another user's outbox, as on a room PC
    for path in (data, *data.iterdir()):
        os.chown(path, user, user)

    out = Path(run(BACKUP, "--dest", str(tmp_path / "backups"), "--outbox", str(outbox)).strip().splitlines()[-1])
    assert len(records(out / "outbox.sqlite3")) == 1
    owners = {p.name: p.stat().st_uid for p in data.iterdir()}
    assert set(owners.values()) == {user}, owners

    def refused(script: Path, *args: str) -> str:
        done = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 1, f"{script.name} {' '.join(args)} was not refused: {done.stderr}"
        return done.stderr

    assert "inside the outbox's folder" in refused(BACKUP, "--dest", str(data / "backups"), "--outbox", str(outbox))
    assert not (data / "backups").exists()

    holder = sqlite3.connect(outbox)  # a gateway still running
    try:
        assert "stop the gateway first" in refused(RESTORE, "--from", str(out), "--outbox", str(outbox))
    finally:
        holder.close()
    run(RESTORE, "--from", str(out), "--outbox", str(outbox))
    assert [p.name for p in data.glob("outbox.sqlite3.before-restore-*")], "the replaced outbox was not kept"
    assert {p.stat().st_uid for p in data.iterdir()} == {user}
    assert mode(outbox) == "0o600" and mode(data) == "0o700"
    with sqlite3.connect(f"{outbox.as_uri()}?mode=ro", uri=True) as restored:
        (seq,) = restored.execute("SELECT seq FROM sequences WHERE key = ?", (KEY,)).fetchone()
    assert seq >= 5 + 2000, "sequence numbers continue after a jump"
