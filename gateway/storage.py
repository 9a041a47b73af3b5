"""Opening the outbox's file: permissions, integrity, schema version, salvage of a damaged file, sequence marks.

Why a module of its own: the outbox (gateway/outbox.py) commits and reads records; everything that must be true
before its first commit lives here, at start-up, on the outbox's writer thread:
- **Permissions.** The file holds vital signs: the data directory is made 0700 and every outbox file 0600 whatever
  the umask (the database is created 0600 before SQLite opens it; SQLite gives -wal and -shm the database's mode).
- **Integrity.** `PRAGMA quick_check` must answer `ok`. A file that fails it, or that SQLite cannot read at all, is
  damaged: its records are **salvaged** (read page by page from the file and its -wal, see `carve`), re-committed
  to a new outbox with each sink's cursor, and only then is the damaged file moved aside
  (`<name>.corrupt-<time>`, kept for inspection). An interrupted salvage is finished or redone at the next start.
- **Schema version.** `PRAGMA user_version` says which tables a file has; MIGRATIONS bring an older file forward
  in one transaction each; a file from a newer gateway is refused (Fatal, exit 3), never written to.
- **Sequence marks.** Message ids are `room/device/seq`. Sequence numbers are reserved ahead in a small file beside
  the outbox (`<stem>.seq`, `SequenceMarks`), so a new outbox (the old one moved aside or deleted) continues above
  every number that may have been used: a gap, never a reuse (docs/mqtt.md).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import mmap
import os
import sqlite3
import stat
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
SIDE_FILES = ("-wal", "-shm")

# Version 1: records, cursors, sequences, state, rejected. Files written before versioning (user_version 0) are
# the same, except those from before commit 3262300, which have no `state` table.
SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,          -- room/device
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    body TEXT NOT NULL,         -- the JSON record, exactly as sinks receive it
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cursors (sink TEXT PRIMARY KEY, last_id INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sequences (key TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS state (name TEXT PRIMARY KEY, body TEXT NOT NULL);  -- e.g. the alarm engine's
CREATE TABLE IF NOT EXISTS rejected (
    sink TEXT NOT NULL, record_id INTEGER NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL, body TEXT NOT NULL
);
"""
# (version it brings a file to, SQL): applied in order, each in one transaction with its user_version. A change to
# SCHEMA adds a step here and raises SCHEMA_VERSION; tests/gateway/test_storage.py opens a file of each old version.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (1, "CREATE TABLE IF NOT EXISTS state (name TEXT PRIMARY KEY, body TEXT NOT NULL);"),
)

LEASE = 1000  # sequence numbers reserved ahead per key; a new lease is written when half of one is used
_DAMAGE_CODES = frozenset({11, 26, 522})  # SQLITE_CORRUPT, SQLITE_NOTADB, SQLITE_IOERR_SHORT_READ (truncated)


@dataclass
class OpenReport:
    """What opening found and did, for the log, the health of the outbox and tests."""

    fixed_modes: list[str] = field(default_factory=list)
    migrated_from: int | None = None  # the file's user_version before its migrations (None: none ran)
    damage: str | None = None  # why the file was moved aside
    aside: Path | None = None
    salvaged: int = 0  # records re-committed to the new outbox
    salvaged_undecodable: int = 0  # of those, records whose body is no longer JSON (rejected when read)
    sequences_from_marks: dict[str, int] = field(default_factory=dict)  # keys that continue after their mark


# -- permissions -------------------------------------------------------------------------------------------------


def _belongs(path: Path, name: str) -> bool:
    return name.startswith(path.name) or name == marks_path(path).name


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT; on any error a ROLLBACK (unless a failed COMMIT already rolled back), and the
    first error raised, never masked by the rollback's own ("cannot rollback - no transaction is active")."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def secure(path: Path) -> list[str]:
    """Data directory 0700, the outbox's files 0600; what was changed, one line each (logged as a warning). A
    shared directory (sticky, like /tmp) or one owned by another user is left alone with an error: the outbox
    belongs in a directory of its own."""
    fixed: list[str] = []
    folder = path.parent
    info = folder.stat()
    mode = stat.S_IMODE(info.st_mode)
    if mode != DIR_MODE:
        if info.st_mode & stat.S_ISVTX or info.st_uid != os.geteuid():
            log.error(
                "outbox directory %s is %03o and shared or not ours: left as is; use a directory of its own",
                folder,
                mode,
            )
        else:
            try:
                os.chmod(folder, DIR_MODE)
                fixed.append(f"{folder} {mode:03o} -> {DIR_MODE:03o}")
            except OSError as exc:
                log.error("outbox directory %s is %03o and cannot be made %03o: %s", folder, mode, DIR_MODE, exc)
    for entry in folder.iterdir():
        if not _belongs(path, entry.name) or entry.is_symlink() or not entry.is_file():
            continue
        try:
            mode = stat.S_IMODE(entry.stat().st_mode)
            if mode != FILE_MODE:
                os.chmod(entry, FILE_MODE)
                fixed.append(f"{entry.name} {mode:03o} -> {FILE_MODE:03o}")
        except FileNotFoundError:
            continue  # gone meanwhile (SQLite's -shm, a probe)
        except OSError as exc:
            log.error("outbox file %s cannot be made %03o: %s", entry, FILE_MODE, exc)
    if fixed:
        log.warning("outbox files were open to other users (vital signs): made owner-only: %s", "; ".join(fixed))
    return fixed


def _create_private(path: Path) -> None:
    """An empty file, 0600 whatever the umask (SQLite then creates -wal and -shm with the same mode)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- sequence marks ----------------------------------------------------------------------------------------------


def marks_path(path: Path) -> Path:
    return path.with_suffix(".seq")


_MARKS_MAGIC = b"OBXSEQ1\n"
_MARKS_HEAD = struct.Struct(">8sQII")  # magic, counter, length, crc32 of the JSON
_MARKS_SLOT = 64 * 1024


class SequenceMarks:
    """Per key, a sequence number no record has gone past: `reserved`, kept ahead of use by LEASE.

    The file has two fixed slots written in turn in place (each with a counter and a CRC): a torn write spoils
    only the slot being written, and a write needs no free blocks, so marks keep moving on a full disk too.

    `undurable` says numbers may have reached a sink before their commit (the outbox cannot write, and live records
    go out anyway): after a crash in that state the outbox's own numbers are behind what was sent, so the next start
    continues after the marks, as for a lost outbox."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reserved: dict[str, int] = {}
        self.saved: dict[str, int] = {}  # what the file holds
        self.found = False  # the file existed with a readable slot
        self.undurable = False
        self._counter = 0
        self._slot = _MARKS_SLOT
        self._saving = False  # a save is queued or under way
        self._again = False  # numbers were reserved since that save took its copy
        self._retry_at = 0.0
        self._lock = threading.Lock()  # one write at a time
        self._flags = threading.Lock()  # _saving, _again and _retry_at, shared by the loop and the writer thread

    def load(self) -> bool:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return False
        best: tuple[int, dict[str, int], bool] | None = None
        slot = max(len(data) // 2, 1)
        for start in (0, slot):
            try:
                magic, counter, length, crc = _MARKS_HEAD.unpack_from(data, start)
                body = data[start + _MARKS_HEAD.size : start + _MARKS_HEAD.size + length]
                if magic != _MARKS_MAGIC or len(body) != length or zlib.crc32(body) != crc:
                    continue
                content = json.loads(body)
                reserved = {str(k): int(v) for k, v in content["reserved"].items()}
                undurable = bool(content.get("undurable", False))
            except (struct.error, ValueError, KeyError, TypeError, AttributeError):
                continue
            if best is None or counter > best[0]:
                best = (counter, reserved, undurable)
        if best is None:
            log.error("sequence marks %s are unreadable: sequence numbers continue from the outbox only", self.path)
            return False
        self._counter, self.reserved, self.undurable = best
        self.saved, self._slot, self.found = dict(self.reserved), slot, True
        return True

    def reserve(self, seqs: dict[str, int]) -> None:
        for key, seq in seqs.items():
            self.reserved[key] = max(self.reserved.get(key, 0), seq + LEASE)

    def due(self, key: str, seq: int, undurable: bool = False) -> bool:
        """Called for every number given (on the event loop, so cheap): whether a save should be queued now,
        because `seq` has used half of what the file holds for `key`, or `undurable` changed. A number given while
        a save is under way makes that save write again when it is done."""
        if undurable != self.undurable:
            self.undurable = undurable
        elif seq <= self.saved.get(key, 0) - LEASE // 2:
            return False
        if seq + LEASE // 2 > self.reserved.get(key, 0):
            self.reserved[key] = seq + LEASE
        with self._flags:
            if self._saving:
                self._again = True
                return False
            if time.monotonic() < self._retry_at:
                return False
            self._saving = True
            return True

    def save(self) -> None:
        """Write `reserved` (again while numbers were given meanwhile) and fsync; on an error, log and let a `due`
        after 5 s queue the next try."""
        try:
            while True:
                with self._flags:
                    self._again = False
                with self._lock:
                    self._write(self.reserved.copy())
                with self._flags:
                    if not self._again:
                        self._saving = False
                        return
        except OSError as exc:
            with self._flags:
                self._retry_at = time.monotonic() + 5.0
                self._saving = False
            log.error("sequence marks %s not written (%s): retried in 5 s", self.path, exc.strerror or exc)

    def _write(self, reserved: dict[str, int]) -> None:
        body = json.dumps({"reserved": reserved, "undurable": self.undurable}, separators=(",", ":")).encode()
        record = _MARKS_HEAD.pack(_MARKS_MAGIC, self._counter + 1, len(body), zlib.crc32(body)) + body
        if len(record) > self._slot or not self.path.exists():
            self._create(max(self._slot, 1 << (2 * len(record) - 1).bit_length()))
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, record, ((self._counter + 1) % 2) * self._slot)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        self._counter += 1
        self.saved = reserved

    def _create(self, slot: int) -> None:
        """A file of two zeroed slots (real blocks, not a sparse file), written beside and renamed into place; the
        current marks go into its first slot before the rename, so no moment is without them."""
        tmp = self.path.with_name(self.path.name + ".new")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)
            os.write(fd, bytes(2 * slot))
            if self.saved:
                # What the file held, as the fallback should the first write into the new file be torn (then as if
                # numbers had gone out undurable: the next start jumps, the safe side).
                body = json.dumps({"reserved": self.saved, "undurable": True}, separators=(",", ":")).encode()
                os.pwrite(fd, _MARKS_HEAD.pack(_MARKS_MAGIC, 0, len(body), zlib.crc32(body)) + body, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        self._slot, self._counter = slot, 0


# -- opening -----------------------------------------------------------------------------------------------------


def _is_damage(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and (code in _DAMAGE_CODES or code & 0xFF in _DAMAGE_CODES)


def connect(path: Path) -> sqlite3.Connection:
    """The writer's connection: WAL, synchronous=FULL (a commit survives a power cut, not only a crash)."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
    except BaseException:
        db.close()
        raise
    return db


def check(db: sqlite3.Connection) -> str | None:
    """quick_check's findings (the first three), or None when it says ok."""
    rows = [str(row[0]) for row in db.execute("PRAGMA quick_check(3)").fetchall()]
    return None if rows == ["ok"] else "; ".join(rows) or "quick_check returned nothing"


def migrate(db: sqlite3.Connection, path: Path) -> int | None:
    """Bring the file to SCHEMA_VERSION (a new file: create it); the version it had, or None if it was current."""
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        from gateway.preflight import EXIT_STORAGE, Fatal  # here: the outbox's worker processes import this module

        # Its tables may mean what this version does not know: never written to, never moved aside.
        raise Fatal(
            EXIT_STORAGE,
            f"outbox {path} has schema version {version}, this gateway knows up to {SCHEMA_VERSION} -> run the "
            "gateway version that wrote it (or a newer one); moving the file aside would leave what it owes unsent",
        )
    if version == SCHEMA_VERSION:
        return None
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    steps = [(SCHEMA_VERSION, SCHEMA)] if "records" not in tables else [m for m in MIGRATIONS if m[0] > version]
    for target, sql in steps:
        with transaction(db):
            for statement in sql.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {int(target)}")
    if "records" in tables:
        log.warning("outbox %s migrated from schema version %d to %d", path, version, SCHEMA_VERSION)
        return int(version)
    return None


def open_outbox(path: Path, sinks: tuple[str, ...]) -> tuple[sqlite3.Connection, SequenceMarks, OpenReport]:
    """Open (or create, or salvage) the outbox at `path`; see the module's docstring. Raises Fatal for a file of
    a newer schema, and
    OSError / sqlite3.OperationalError for a disk that cannot be written (those are not damage: the file stays)."""
    report = OpenReport()
    path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    _finish_interrupted_salvage(path)
    report.fixed_modes = secure(path)
    marks = SequenceMarks(marks_path(path))
    marks.load()
    existed = path.exists() and path.stat().st_size > 0
    if not path.exists():
        _create_private(path)
    db: sqlite3.Connection | None = None
    try:
        db = connect(path)
        report.damage = check(db)
        if report.damage is None:
            report.migrated_from = migrate(db, path)
    except sqlite3.DatabaseError as exc:
        if not _is_damage(exc):
            if db is not None:
                db.close()
            raise
        report.damage = str(exc) or type(exc).__name__
    if report.damage is not None:
        if db is not None:
            db.close()
        log.error("outbox %s is damaged (%s): salvaging what can be read", path, report.damage)
        _salvage(path, sinks, report)
        db = connect(path)
    assert db is not None
    try:
        lost = report.damage is not None or (not existed and marks.found) or marks.undurable
        _continue_sequences(db, path, marks, report, lost)
        # A sink added to an existing outbox starts at its head: it gets what comes from now on, not the history
        # (a notify sink added after a year must not page a year of alarms). In a new file the head is 0.
        db.executemany(
            "INSERT OR IGNORE INTO cursors(sink, last_id) VALUES "
            "(?, (SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'records'))",
            [(s,) for s in sinks],
        )
    except BaseException:
        db.close()
        raise
    secure(path)  # the -wal and -shm SQLite has just created (they take the database's mode: a check, no more)
    return db, marks, report


def _continue_sequences(
    db: sqlite3.Connection, path: Path, marks: SequenceMarks, report: OpenReport, lost: bool
) -> None:
    """Numbers go on from the outbox's; from the marks when the outbox's may be behind what was used: the outbox
    was lost (damaged and salvaged, or deleted), or it is older than its marks (a restored copy)."""
    seqs = {str(k): int(v) for k, v in db.execute("SELECT key, seq FROM sequences")}
    ahead: dict[str, int] = {}
    for key, reserved in marks.reserved.items():
        known = seqs.get(key, 0)
        if (lost and reserved > known) or known < reserved - 2 * LEASE:
            ahead[key] = reserved
    if ahead:
        # Into the outbox now if it takes a write (on a full disk it does not: the Outbox starts from
        # report.sequences_from_marks, and its first commit of each key writes them).
        try:
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.executemany(
                    "INSERT INTO sequences(key, seq) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET seq = excluded.seq",
                    list(ahead.items()),
                )
        except sqlite3.OperationalError as exc:
            log.error("outbox %s: the continued sequence numbers are not saved yet (%s)", path, exc)
        seqs.update(ahead)
        report.sequences_from_marks = ahead
        log.warning(
            "outbox %s %s: sequence numbers of %d key(s) continue after their reserved marks (a gap, never a reuse)",
            path,
            "was lost" if lost else "is older than its sequence marks",
            len(ahead),
        )
    marks.undurable = False  # what the file says of the last run has been acted on
    marks.reserve(seqs)
    marks.save()


# -- salvage -----------------------------------------------------------------------------------------------------


def _salvage_paths(path: Path) -> tuple[Path, Path]:
    """Where a salvage builds the new outbox, and the name it takes once complete."""
    return path.with_name(path.name + ".salvage-tmp"), path.with_name(path.name + ".salvage")


def _finish_interrupted_salvage(path: Path) -> None:
    """A salvage builds the new outbox under a temporary name, renames it `.salvage` once complete, then moves the
    damaged files aside and puts it in their place. After a crash, a complete one is put in place now; an
    incomplete one is deleted (the damaged file is still there: it is salvaged again)."""
    tmp, done = _salvage_paths(path)
    for suffix in ("", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            Path(f"{tmp}{suffix}").unlink()
    if done.exists():
        _replace_damaged(path, done)
        log.warning("outbox %s: an interrupted salvage finished", path)


def _aside_path(path: Path) -> Path:
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    n = 1
    while any(Path(f"{aside}{s}").exists() for s in ("", *SIDE_FILES)):
        aside, n = path.with_name(f"{path.name}.corrupt-{int(time.time())}-{n}"), n + 1
    return aside


def _replace_damaged(path: Path, done: Path) -> Path | None:
    """Move the damaged file and its -wal and -shm aside (kept for inspection), then the salvaged file into place."""
    aside = None
    for suffix in (*SIDE_FILES, ""):  # the -wal first: it must never meet the new file
        source = Path(f"{path}{suffix}")
        if source.exists():
            aside = aside or _aside_path(path)
            os.replace(source, f"{aside}{suffix}")
    _fsync_dir(path.parent)
    os.replace(done, path)
    _fsync_dir(path.parent)
    return aside


def _salvage(path: Path, sinks: tuple[str, ...], report: OpenReport) -> None:
    carved = carve(path, Path(f"{path}-wal"), sinks)
    tmp, done = _salvage_paths(path)
    for leftover in (tmp, Path(f"{tmp}-journal"), done):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    _create_private(tmp)
    db = sqlite3.connect(tmp, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous=FULL")
        report.salvaged, report.salvaged_undecodable = _recommit(db, carved, sinks)
    finally:
        db.close()
    os.replace(tmp, done)
    _fsync_dir(path.parent)
    report.aside = _replace_damaged(path, done)
    log.error(
        "outbox %s moved aside to %s; %d undelivered record(s) salvaged into a new outbox (%d no longer JSON: they go "
        "to the rejected pile); cursors %s",
        path,
        report.aside,
        report.salvaged,
        report.salvaged_undecodable,
        carved.cursors or "unreadable (everything salvaged is sent again)",
    )


def _recommit(db: sqlite3.Connection, carved: Carved, sinks: tuple[str, ...]) -> tuple[int, int]:
    """Carved rows into a new file (one transaction): records above what every sink has settled, in their old order,
    numbered afresh from 1 (a damaged row id may collide with a sound one: both are kept); each sink's cursor mapped
    onto the new numbers; sequences, state and the rejected pile as found."""
    known = {s: carved.cursors[s] for s in sinks if s in carved.cursors}
    floor = min(known.values()) if len(known) == len(sinks) else 0
    # A page freed by a prune may still hold copies of rows: the same id with the same bytes is one record.
    rows = sorted({(r[0], r[4]): r for r in carved.records if r[0] > floor}.values(), key=lambda r: r[0])
    undecodable = 0
    for row in rows:
        try:
            json.loads(row[4])
        except ValueError:
            undecodable += 1
    seqs = dict(carved.sequences)
    for _old, key, seq, _type, _body, _created in rows:
        seqs[key] = max(seqs.get(key, 0), seq)
    with transaction(db):
        for statement in SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.executemany(
            "INSERT INTO records(key, seq, type, body, created) VALUES (?, ?, ?, ?, ?)",
            [(key, seq, kind, _text_or_blob(body), created) for _o, key, seq, kind, body, created in rows],
        )
        old_ids = [r[0] for r in rows]  # sorted: a cursor's new value is how many salvaged records it had passed
        db.executemany(
            "INSERT INTO cursors(sink, last_id) VALUES (?, ?)",
            [(s, bisect.bisect_right(old_ids, known[s]) if s in known else 0) for s in sinks],
        )
        db.executemany("INSERT INTO sequences(key, seq) VALUES (?, ?)", list(seqs.items()))
        db.executemany("INSERT INTO state(name, body) VALUES (?, ?)", list(carved.state.items()))
        db.executemany(
            "INSERT INTO rejected(sink, record_id, reason, at, body) VALUES (?, ?, ?, ?, ?)", carved.rejected
        )
    return len(rows), undecodable


def _text_or_blob(raw: bytes) -> str | bytes:
    """Text as it was; bytes that are no longer UTF-8 stay bytes (a blob), for the reader to reject with the reason."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


# -- carving: rows read straight from the pages of a damaged file ------------------------------------------------
#
# The SQLite file format (https://www.sqlite.org/fileformat2.html): a file is pages of one size; table rows live in
# the cells of table-leaf pages (type 0x0D); a row too large for its page continues in a chain of overflow pages.
# A -wal file holds newer copies of pages in checksummed frames. Reading every leaf page on its own, without the
# interior pages or the schema that lead to it, finds every row on a sound page whatever else is damaged (header,
# interior pages, a zeroed or truncated stretch). Each table's rows are told apart by their shape (column types).


@dataclass
class Carved:
    records: list[tuple[int, str, int, str, bytes, float]] = field(default_factory=list)  # id, key, seq, type, body
    cursors: dict[str, int] = field(default_factory=dict)
    sequences: dict[str, int] = field(default_factory=dict)
    state: dict[str, str] = field(default_factory=dict)
    rejected: list[tuple[str, int, str, float, str]] = field(default_factory=list)
    pages: int = 0
    leaves: int = 0


_SQLITE_MAGIC = b"SQLite format 3\x00"
_WAL_MAGICS = {0x377F0682: "<", 0x377F0683: ">"}


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for i in range(8):
        byte = buf[pos + i]
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, pos + i + 1
    return (value << 8) | buf[pos + 8], pos + 9


def _column(serial: int, buf: bytes, pos: int) -> tuple[Any, int]:
    """(value, size) of one column of serial type `serial` at `pos`; text and blobs as bytes."""
    if serial == 0:
        return None, 0
    if 1 <= serial <= 6:
        size = (1, 2, 3, 4, 6, 8)[serial - 1]
        chunk = buf[pos : pos + size]
        if len(chunk) != size:
            raise IndexError
        return int.from_bytes(chunk, "big", signed=True), size
    if serial == 7:
        return struct.unpack_from(">d", buf, pos)[0], 8
    if serial in (8, 9):
        return serial - 8, 0
    if serial >= 12:
        size = (serial - 12) // 2
        chunk = bytes(buf[pos : pos + size])
        if len(chunk) != size:
            raise IndexError
        return chunk, size
    raise ValueError(f"reserved serial type {serial}")


def _row(payload: bytes) -> tuple[str, list[Any]] | None:
    """(shape, values) of a record, shape one letter a column (n null, i int, f float, t text, b blob); None if
    the record's header and its length disagree (a damaged cell)."""
    try:
        header, pos = _varint(payload, 0)
        if not 0 < header <= len(payload):
            return None
        serials = []
        while pos < header:
            serial, pos = _varint(payload, pos)
            serials.append(serial)
        if pos != header:
            return None
        values, shape, at = [], [], header
        for serial in serials:
            value, size = _column(serial, payload, at)
            at += size
            values.append(value)
            shape.append(
                "n" if serial == 0 else "f" if serial == 7 else "i" if serial < 12 else "b" if serial % 2 == 0 else "t"
            )
        if at != len(payload):
            return None
        return "".join(shape), values
    except (IndexError, ValueError, struct.error):
        return None


class _Pages:
    """Pages of a file and its -wal (the newest committed copy of each page wins)."""

    def __init__(self, data: bytes | mmap.mmap, wal: dict[int, bytes], size: int, usable: int) -> None:
        self.data, self.wal, self.size, self.usable = data, wal, size, usable
        self.count = max((len(data) + size - 1) // size, max(wal, default=0))

    def get(self, number: int) -> bytes | None:
        if number in self.wal:
            return self.wal[number]
        start = (number - 1) * self.size
        if number < 1 or start >= len(self.data):
            return None
        return bytes(self.data[start : start + self.size])  # the last may be short (a truncated file)

    def chain(self, first: int, length: int) -> bytes | None:
        """`length` bytes of overflow content starting at page `first`; None if the chain is broken."""
        parts: list[bytes] = []
        number, left = first, length
        for _ in range(length // max(self.usable - 4, 1) + 2):
            if left <= 0:
                break
            page = self.get(number)
            if page is None or len(page) < 4:
                return None
            take = min(left, self.usable - 4)
            chunk = page[4 : 4 + take]
            if len(chunk) != take:
                return None
            parts.append(chunk)
            left -= take
            number = int.from_bytes(page[:4], "big")
        return b"".join(parts) if left <= 0 else None


def _leaf_rows(pages: _Pages, page: bytes, offset: int) -> Iterator[tuple[int, bytes]]:
    """(rowid, payload) of every cell of a table-leaf page that can be read whole."""
    usable = pages.usable
    cells = int.from_bytes(page[offset + 3 : offset + 5], "big")
    pointers = offset + 8
    if pointers + 2 * cells > len(page):
        cells = max(0, (len(page) - pointers) // 2)
    most, least = usable - 35, ((usable - 12) * 32 // 255) - 23
    for i in range(cells):
        cell = int.from_bytes(page[pointers + 2 * i : pointers + 2 * i + 2], "big")
        if cell < pointers + 2 * cells or cell >= len(page):
            continue
        try:
            size, pos = _varint(page, cell)
            rowid, pos = _varint(page, pos)
        except IndexError:
            continue
        if size <= most:
            local = size
        else:
            spill = least + (size - least) % (usable - 4)
            local = spill if spill <= most else least
        payload = page[pos : pos + local]
        if len(payload) != local:
            continue
        if local < size:
            rest = pages.chain(int.from_bytes(page[pos + local : pos + local + 4], "big"), size - local)
            if rest is None:
                continue
            payload += rest
        yield rowid, payload


def _wal_pages(wal_path: Path, page_size: int | None) -> tuple[dict[int, bytes], int | None]:
    """The pages of the -wal's committed frames (checksums and salts valid) and its page size."""
    try:
        data = wal_path.read_bytes()
    except FileNotFoundError:
        return {}, None
    if len(data) < 32:
        return {}, None
    magic, _version, size, _ckpt, salt1, salt2, c1, c2 = struct.unpack_from(">8I", data, 0)
    order = _WAL_MAGICS.get(magic)
    if order is None or size & (size - 1) or not 512 <= size <= 65536:
        log.error("outbox wal %s has no valid header: its pages are not used", wal_path)
        return {}, None
    if page_size is not None and size != page_size:
        return {}, None
    words = struct.Struct(f"{order}2I")

    def checksum(chunk: bytes, s0: int, s1: int) -> tuple[int, int]:
        for x0, x1 in words.iter_unpack(chunk):
            s0 = (s0 + x0 + s1) & 0xFFFFFFFF
            s1 = (s1 + x1 + s0) & 0xFFFFFFFF
        return s0, s1

    s0, s1 = checksum(data[:24], 0, 0)
    if (s0, s1) != (c1, c2):
        return {}, None
    committed: dict[int, bytes] = {}
    frame: dict[int, bytes] = {}
    pos = 32
    while pos + 24 + size <= len(data):
        number, commit, f1, f2, k1, k2 = struct.unpack_from(">6I", data, pos)
        page = data[pos + 24 : pos + 24 + size]
        s0, s1 = checksum(data[pos : pos + 8] + page, s0, s1)
        if (f1, f2) != (salt1, salt2) or (s0, s1) != (k1, k2):
            break
        frame[number] = page
        if commit:
            committed.update(frame)
            frame = {}
        pos += 24 + size
    return committed, size


def _header_page_size(data: bytes | mmap.mmap) -> int | None:
    """The page size the file's header gives, if the header is sound."""
    head = bytes(data[:100])
    if head[:16] != _SQLITE_MAGIC:
        return None
    size = int.from_bytes(head[16:18], "big")
    size = 65536 if size == 1 else size
    return size if 512 <= size <= 65536 and not size & (size - 1) else None


def _looks_like_btree_page(data: bytes | mmap.mmap, start: int, size: int) -> bool:
    if data[start] not in (2, 5, 10, 13):
        return False
    cells = int.from_bytes(data[start + 3 : start + 5], "big")
    content = int.from_bytes(data[start + 5 : start + 7], "big") or 65536
    return 12 + 2 * cells <= content <= size


def _guess_page_size(data: bytes | mmap.mmap) -> int | None:
    """With no header to say: the smallest page size under which nearly as large a share of the pages look like
    b-tree pages as under any other, over the same stretch of the file. A multiple of the true size looks as good
    (its pages are some of the true pages), a fraction of it clearly worse (half its "pages" start mid-page). (A count
    per size over 400 pages each favoured a larger size, which reached further into the file than the free pages a
    prune leaves at its start.)"""
    span = min(len(data), 400 * 65536)
    shares: dict[int, float] = {}
    for size in (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536):
        starts = range(1, span // size)
        if len(starts) >= 4:
            shares[size] = sum(_looks_like_btree_page(data, n * size, size) for n in starts) / len(starts)
    best = max(shares.values(), default=0.0)
    if best == 0:
        return None
    return min(size for size, share in shares.items() if share >= 0.7 * best)


def carve(path: Path, wal_path: Path, sinks: tuple[str, ...]) -> Carved:
    """Every row that can be read whole from the table-leaf pages of `path` and its -wal, sorted by table."""
    carved = Carved()
    with path.open("rb") as handle:
        size_on_disk = os.fstat(handle.fileno()).st_size
        data: bytes | mmap.mmap = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size_on_disk else b""
    try:
        page_size = _header_page_size(data)
        wal, wal_size = _wal_pages(wal_path, page_size)
        page_size = page_size or wal_size or _guess_page_size(data)
        if page_size is None:
            log.error("outbox %s: no page of it can be read", path)
            return carved
        header_ok = bytes(data[:16]) == _SQLITE_MAGIC
        reserved = data[20] if header_ok and len(data) > 20 else 0
        pages = _Pages(data, wal, page_size, page_size - reserved)
        carved.pages = pages.count
        states: dict[str, tuple[int, str]] = {}
        for number in range(2, pages.count + 1):  # page 1 is the schema's: nothing of ours
            page = pages.get(number)
            if page is None or not page or page[0] != 0x0D:
                continue
            carved.leaves += 1
            rank = 1 if number in wal else 0
            for rowid, payload in _leaf_rows(pages, page, 0):
                _sort(carved, rowid, payload, sinks, states, rank)
        carved.state = {name: body for name, (_rank, body) in states.items()}
    finally:
        if isinstance(data, mmap.mmap):
            data.close()
    return carved


_RECORD_SHAPES = frozenset(f"ntit{b}{c}" for b in "tb" for c in "fi")
_REJECTED_SHAPES = frozenset(f"tit{c}{b}" for b in "tb" for c in "fi")


def _sort(
    carved: Carved,
    rowid: int,
    payload: bytes,
    sinks: tuple[str, ...],
    states: dict[str, tuple[int, str]],
    rank: int,
) -> None:
    """File one carved row under its table, by shape. Cursors and sequences only grow: the largest copy wins."""
    row = _row(payload)
    if row is None:
        return
    shape, values = row
    text: Callable[[bytes], str] = lambda raw: raw.decode("utf-8", "replace")  # noqa: E731
    if shape in _RECORD_SHAPES and rowid > 0:
        _, key, seq, kind, body, created = values
        carved.records.append((rowid, text(key), int(seq), text(kind), body, float(created)))
    elif shape == "ti":
        name, number = text(values[0]), int(values[1])
        if name in sinks:
            carved.cursors[name] = max(carved.cursors.get(name, 0), number)
        elif "/" in name:
            carved.sequences[name] = max(carved.sequences.get(name, 0), number)
    elif shape == "tt":
        name = text(values[0])
        try:
            body = values[1].decode("utf-8")
        except UnicodeDecodeError:
            return
        if name not in states or rank >= states[name][0]:
            states[name] = (rank, body)
    elif shape in _REJECTED_SHAPES:
        sink, record_id, reason, at, body = values
        carved.rejected.append((text(sink), int(record_id), text(reason), float(at), text(body)))
