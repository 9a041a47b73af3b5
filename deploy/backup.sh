#!/usr/bin/env bash
# Back up the gateway's outbox and InfluxDB, while they run, to a folder outside their data (docs/operations.md).
#
# Usage: deploy/backup.sh --dest DIR [--outbox FILE] [--influx1 HOST:PORT [--database DB]]
#                         [--influx2 URL --token-file FILE] [--python PYTHON]
#   --dest        where backups go: a disk or share that is not the data's (refused inside the outbox's folder); each
#                 run writes DIR/<UTC time>-<host>/, mode 0700, every file in it 0600
#   --outbox      the outbox of a room PC's gateway: /var/lib/infusion-telemetry/outbox.sqlite3 under systemd, the
#                 gateway-data volume's outbox.sqlite3 under compose. Copied with SQLite's online backup API, as one
#                 consistent snapshot while the gateway goes on writing (a file copy of a live WAL database can be torn
#                 or miss what is still in its -wal); its sequence marks (outbox.seq) beside it
#   --influx1     InfluxDB 1.x: its RPC address (bind-address in influxdb.conf, 127.0.0.1:8088 by default), for
#                 `influxd backup -portable`; --database one database (default: all)
#   --influx2     InfluxDB 2.x: its URL, for `influx backup` (the influx CLI); --token-file a file holding an operator
#                 token (given to the CLI in its environment, never on a command line). Not run by the tests: no
#                 InfluxDB 2 on the test machine
#   --python      the Python 3 that runs SQLite's backup (default: python3; only the standard library is used)
#
# The backup holds vital signs: keep it owner-only, copy it off the machine (the point of a backup) and delete old
# ones by the clinic's retention rule. SHA256SUMS lets deploy/restore.sh check each file before it uses it.
# Exit: 0 done, 1 a step failed (named on stderr), 2 wrong usage.
set -euo pipefail
umask 077

usage() { awk 'NR > 2 && !/^#/ { exit } NR > 2 { sub(/^# ?/, ""); print }' "$0" >&2; exit 2; }
fail() { echo "backup: error: $*" >&2; exit 1; }

dest="" outbox="" influx1="" database="" influx2="" token_file="" python="python3"
while [ $# -gt 0 ]; do
  case "$1" in
    --dest) dest="${2:?}"; shift 2 ;;
    --outbox) outbox="${2:?}"; shift 2 ;;
    --influx1) influx1="${2:?}"; shift 2 ;;
    --database) database="${2:?}"; shift 2 ;;
    --influx2) influx2="${2:?}"; shift 2 ;;
    --token-file) token_file="${2:?}"; shift 2 ;;
    --python) python="${2:?}"; shift 2 ;;
    -h|--help) usage ;;
    *) echo "backup: unknown argument: $1" >&2; usage ;;
  esac
done
[ -n "$dest" ] || { echo "backup: --dest is required" >&2; usage; }
[ -n "$outbox$influx1$influx2" ] || { echo "backup: nothing to back up: give --outbox, --influx1 or --influx2" >&2; usage; }
[ -z "$influx2" ] || [ -n "$token_file" ] || { echo "backup: --influx2 needs --token-file" >&2; usage; }
[ -z "$database" ] || [ -n "$influx1" ] || { echo "backup: --database goes with --influx1" >&2; usage; }

dest="$(realpath -m "$dest")"
if [ -n "$outbox" ]; then
  [ -f "$outbox" ] || fail "no outbox at $outbox"
  data_dir="$(cd "$(dirname "$outbox")" && pwd -P)"
  case "$dest/" in
    "$data_dir"/*) fail "--dest $dest is inside the outbox's folder $data_dir: a backup must survive losing it" ;;
  esac
  mkdir -p "$dest"
  if [ "$(stat -c %d "$dest")" = "$(stat -c %d "$data_dir")" ]; then
    echo "backup: warning: $dest is on the same file system as $data_dir: copy the backup off this disk" >&2
  fi
fi

mkdir -p "$dest"
out="$dest/$(date -u +%Y%m%dT%H%M%SZ)-$(hostname -s)"
mkdir -m 700 "$out" || fail "cannot create $out (a backup of this second exists?)"
{
  echo "created=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "created_epoch=$(date -u +%s)"
  echo "host=$(hostname)"
} >"$out/MANIFEST"

if [ -n "$outbox" ]; then
  # One backup step (pages=-1) copies every page under one read transaction: a consistent snapshot, while the
  # gateway's writer goes on (WAL). The source is opened read-only: this never writes the outbox. As root, SQLite
  # gives a -wal or -shm it has to create the database file's owner, so the gateway can still open them.
  "$python" - "$outbox" "$out/outbox.sqlite3" >>"$out/MANIFEST" <<'PY' || fail "outbox backup of $outbox failed"
import os
import shutil
import sqlite3
import sys
from pathlib import Path

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
os.close(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
source = sqlite3.connect(f"{src.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
target = sqlite3.connect(dst, isolation_level=None)
try:
    source.backup(target)
finally:
    source.close()
found = [row[0] for row in target.execute("PRAGMA quick_check").fetchall()]
if found != ["ok"]:
    sys.exit(f"the copy fails quick_check: {found[:3]}")
target.execute("PRAGMA journal_mode=DELETE")  # the copy is one self-contained file
(records,) = target.execute("SELECT count(*) FROM records").fetchone()
(head,) = target.execute("SELECT coalesce(max(id), 0) FROM records").fetchone()
target.close()
print(f"outbox={src}\noutbox_records={records}\noutbox_last_id={head}")
marks = src.with_suffix(".seq")  # two checksummed slots written in place: a copy of it is sound
if marks.exists():
    with marks.open("rb") as f, open(os.open(dst.with_suffix(".seq"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as t:
        shutil.copyfileobj(f, t)
    print("outbox_marks=yes")
else:
    print("outbox_marks=no")
PY
  echo "backup: outbox $outbox -> $out/outbox.sqlite3 ($(grep '^outbox_records=' "$out/MANIFEST" | cut -d= -f2) records)"
fi

if [ -n "$influx1" ]; then
  influxd="$(command -v influxd || echo /usr/bin/influxd)"
  [ -x "$influxd" ] || fail "influxd not found (InfluxDB 1.x: the influxdb package)"
  args=(backup -portable -host "$influx1")
  [ -z "$database" ] || args+=(-database "$database")
  "$influxd" "${args[@]}" "$out/influxdb" >"$out/influxd-backup.log" 2>&1 \
    || fail "influxd backup against $influx1 failed: $(tail -n 5 "$out/influxd-backup.log")"
  echo "influx=1.x $influx1 database=${database:-all}" >>"$out/MANIFEST"
  echo "backup: InfluxDB 1.x $influx1 (${database:-all databases}) -> $out/influxdb"
fi

if [ -n "$influx2" ]; then
  command -v influx >/dev/null 2>&1 || fail "the influx CLI (InfluxDB 2.x) is not installed"
  [ -r "$token_file" ] || fail "cannot read --token-file $token_file"
  INFLUX_TOKEN="$(cat "$token_file")" influx backup "$out/influxdb" --host "$influx2" >"$out/influx-backup.log" 2>&1 \
    || fail "influx backup against $influx2 failed: $(tail -n 5 "$out/influx-backup.log")"
  echo "influx=2.x $influx2" >>"$out/MANIFEST"
  echo "backup: InfluxDB 2.x $influx2 -> $out/influxdb"
fi

# Owner-only, whatever the tools did; then the checksums restore.sh verifies.
chmod -R u=rwX,go= "$out"
sums="$(cd "$out" && find . -type f -print0 | sort -z | xargs -0 sha256sum)" || fail "sha256sum failed"
printf '%s\n' "$sums" >"$out/SHA256SUMS"
open_files="$(find "$out" -perm /077 | head -n 3)"
[ -z "$open_files" ] || fail "readable by others: $open_files"
echo "$out"
