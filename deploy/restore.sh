#!/usr/bin/env bash
# Restore what deploy/backup.sh wrote: the gateway's outbox and InfluxDB (docs/operations.md, "Restore").
#
# Usage: deploy/restore.sh --from BACKUP [--outbox FILE [--owner USER:GROUP]]
#                          [--influx1 HOST:PORT [--database DB] [--newdb NAME]] [--influx2 URL --token-file FILE]
#                          [--python PYTHON]
#   --from        one backup folder (DIR/<UTC time>-<host>/); every file is checked against its SHA256SUMS first
#   --outbox      where the gateway's outbox goes (its config's data_dir/outbox.sqlite3). The gateway must be stopped:
#                 refused while any process has the file open. An outbox already there is moved aside
#                 (FILE.before-restore-<time>, with its -wal), never deleted: it may hold what no backup has.
#                 The outbox.seq already there is kept (it is newer than the backup's). Sequence numbers in the restored
#                 outbox jump ahead by 1,000 a second since the backup (and at least 2,000), so no id used after the
#                 backup is ever given again (docs/mqtt.md: a gap, never a reuse)
#   --owner       the gateway's user and group (default: the owner of the outbox's folder); files 0600, folder 0700
#   --influx1     InfluxDB 1.x RPC address for `influxd restore -portable` into the RUNNING server; the database
#                 must not exist there (stop the gateways first, or they create it): or give --newdb NAME to restore
#                 beside it. --database one database of the backup (default: every one in it)
#   --influx2     InfluxDB 2.x URL for `influx restore --full` with an operator token from --token-file (not run by
#                 the tests: no InfluxDB 2 on the test machine)
#   --python      the Python 3 for the outbox steps (default: python3; only the standard library is used)
# Exit: 0 done, 1 a step failed (named on stderr), 2 wrong usage.
set -euo pipefail
umask 077

usage() { awk 'NR > 2 && !/^#/ { exit } NR > 2 { sub(/^# ?/, ""); print }' "$0" >&2; exit 2; }
fail() { echo "restore: error: $*" >&2; exit 1; }

from="" outbox="" owner="" influx1="" database="" newdb="" influx2="" token_file="" python="python3"
while [ $# -gt 0 ]; do
  case "$1" in
    --from) from="${2:?}"; shift 2 ;;
    --outbox) outbox="${2:?}"; shift 2 ;;
    --owner) owner="${2:?}"; shift 2 ;;
    --influx1) influx1="${2:?}"; shift 2 ;;
    --database) database="${2:?}"; shift 2 ;;
    --newdb) newdb="${2:?}"; shift 2 ;;
    --influx2) influx2="${2:?}"; shift 2 ;;
    --token-file) token_file="${2:?}"; shift 2 ;;
    --python) python="${2:?}"; shift 2 ;;
    -h|--help) usage ;;
    *) echo "restore: unknown argument: $1" >&2; usage ;;
  esac
done
[ -n "$from" ] || { echo "restore: --from is required" >&2; usage; }
[ -n "$outbox$influx1$influx2" ] || { echo "restore: nothing to restore: give --outbox, --influx1 or --influx2" >&2; usage; }
[ -z "$influx2" ] || [ -n "$token_file" ] || { echo "restore: --influx2 needs --token-file" >&2; usage; }
[ -z "$newdb" ] || [ -n "$database" ] || { echo "restore: --newdb needs --database (the one to rename)" >&2; usage; }

[ -f "$from/SHA256SUMS" ] || fail "$from has no SHA256SUMS: not a backup of deploy/backup.sh"
(cd "$from" && sha256sum --quiet -c SHA256SUMS) >&2 || fail "files in $from do not match their SHA256SUMS"
manifest_value() { sed -n "s/^$1=//p" "$from/MANIFEST" | head -n 1; }

if [ -n "$outbox" ]; then
  [ "$(manifest_value outbox_records)" != "" ] || fail "$from holds no outbox"
  folder="$(dirname "$outbox")"
  mkdir -p "$folder"
  if [ -z "$owner" ]; then owner="$(stat -c %u:%g "$folder")"; fi
  stamp="$(date -u +%Y%m%dT%H%M%SZ)"
  "$python" - "$from" "$outbox" "$owner" "$stamp" "$(manifest_value created_epoch)" <<'PY' || fail "outbox restore failed"
import grp
import os
import pwd
import shutil
import sqlite3
import sys
import time
from pathlib import Path

backup, target, owner, stamp, created = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
user, _, group = owner.partition(":")
uid = int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid
gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid if group else pwd.getpwuid(uid).pw_gid

# The gateway must be stopped: a process holding the outbox (or its -wal) open would write over what we put there.
# Compared by device and inode, so a gateway in a container (another mount namespace) is found too.
held = set()
for side in ("", "-wal"):
    try:
        st = os.stat(f"{target}{side}")
        held.add((st.st_dev, st.st_ino))
    except FileNotFoundError:
        pass
for fd in Path("/proc").glob("[0-9]*/fd/*"):
    try:
        st = os.stat(fd)
    except OSError:
        continue
    if (st.st_dev, st.st_ino) in held:
        sys.exit(f"process {fd.parts[2]} has {target} open: stop the gateway first")

# Into a new file beside the target, checked and renumbered, then renamed into place: never a half-restored outbox.
tmp = target.with_name(target.name + ".restoring")
tmp.unlink(missing_ok=True)
with (backup / "outbox.sqlite3").open("rb") as f, open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as t:
    shutil.copyfileobj(f, t)
    t.flush()
    os.fsync(t.fileno())
db = sqlite3.connect(tmp, isolation_level=None)
found = [row[0] for row in db.execute("PRAGMA quick_check").fetchall()]
if found != ["ok"]:
    sys.exit(f"the backup's outbox fails quick_check: {found[:3]}")
# Numbers given after the backup are in no file any more: jump past them (1,000 a second is far above what a device
# uses: a reading, a waveform batch and status changes a second).
jump = max(2000, 1000 * (int(time.time()) - int(created or 0)))
db.execute("BEGIN IMMEDIATE")
db.execute("UPDATE sequences SET seq = seq + ?", (jump,))
db.execute("COMMIT")
(records,) = db.execute("SELECT count(*) FROM records").fetchone()
db.close()
os.chown(tmp, uid, gid)
# What is there now goes aside, kept: it may hold records no backup has.
for side in ("", "-wal", "-shm"):
    old = Path(f"{target}{side}")
    if old.exists():
        old.rename(f"{target}.before-restore-{stamp}{side}")
        print(f"restore: kept {old} as {target}.before-restore-{stamp}{side}", file=sys.stderr)
os.replace(tmp, target)
marks, saved = target.with_suffix(".seq"), backup / "outbox.seq"
if marks.exists():
    print(f"restore: kept {marks} (newer than the backup's)", file=sys.stderr)
elif saved.exists():
    with saved.open("rb") as f, open(os.open(marks, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as t:
        shutil.copyfileobj(f, t)
    os.chown(marks, uid, gid)
os.chown(target.parent, uid, gid)
os.chmod(target.parent, 0o700)
dirfd = os.open(target.parent, os.O_RDONLY)
try:
    os.fsync(dirfd)
finally:
    os.close(dirfd)
print(f"restore: outbox {target}: {records} records; sequence numbers continue {jump} further", file=sys.stderr)
PY
fi

if [ -n "$influx1" ]; then
  influxd="$(command -v influxd || echo /usr/bin/influxd)"
  [ -x "$influxd" ] || fail "influxd not found (InfluxDB 1.x: the influxdb package)"
  [ -d "$from/influxdb" ] || fail "$from holds no InfluxDB backup"
  args=(restore -portable -host "$influx1")
  [ -z "$database" ] || args+=(-db "$database")
  [ -z "$newdb" ] || args+=(-newdb "$newdb")
  log="$(mktemp)"
  "$influxd" "${args[@]}" "$from/influxdb" >"$log" 2>&1 || fail "influxd restore against $influx1 failed: $(tail -n 5 "$log")"
  rm -f "$log"
  echo "restore: InfluxDB 1.x $influx1: ${newdb:-${database:-every database of the backup}} restored" >&2
fi

if [ -n "$influx2" ]; then
  command -v influx >/dev/null 2>&1 || fail "the influx CLI (InfluxDB 2.x) is not installed"
  [ -r "$token_file" ] || fail "cannot read --token-file $token_file"
  INFLUX_TOKEN="$(cat "$token_file")" influx restore "$from/influxdb" --full --host "$influx2" \
    || fail "influx restore against $influx2 failed"
  echo "restore: InfluxDB 2.x $influx2 restored (--full: tokens and users as in the backup)" >&2
fi
