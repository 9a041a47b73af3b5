"""What `run` checks before it opens any port, and what its exit code says (README, "Exit codes").

A fatal condition stops the gateway with one line that names it and its fix, and a non-zero exit code, so that
systemd and compose see a failure (and an operator reads a sentence, not a traceback). Whatever can be checked
before the first port opens is checked here: every secret resolves, the data directory takes a write and an fsync.
The outbox itself is opened next, still before any port (Gateway.run); later failures come back as a Fatal from it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import urllib.parse
from pathlib import Path

from gateway.config import Config, ConfigError, register_secret, resolve_secret
from gateway.errors import GatewayError

log = logging.getLogger(__name__)
EXIT_OK = 0  # stopped by SIGTERM / SIGINT, what was owed kept in the outbox
EXIT_INTERNAL = 1  # a gateway task failed or ended (a bug): a restart resumes from the outbox
EXIT_CONFIG = 2  # invalid config, an INFUSION_* variable, a secret that does not resolve: a restart will not help
EXIT_STORAGE = 3  # the data directory or the outbox cannot be written (disk full, permissions, I/O error)

OUTBOX_FILE = "outbox.sqlite3"


class Fatal(GatewayError):
    """Stop the gateway with `code`; `message` is one line: what is wrong -> what to do."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def check_secrets(cfg: Config) -> None:
    """Resolve every configured secret now (and register each for redaction), not when a sink first connects."""
    problems: list[str] = []
    refs = [
        ("mqtt.password", cfg.mqtt.password),
        ("influx.token", cfg.influx.token),
        ("influx.password", cfg.influx.password),
    ]
    if cfg.notify is not None:  # target URLs carry the services' tokens (docs/notifications.md)
        refs += [(f"notify.targets.{name}.url", target.url) for name, target in cfg.notify.targets.items()]
    for field, ref in refs:
        try:
            resolve_secret(ref, field)
        except ConfigError as exc:
            problems.extend(exc.problems)
    register_secret(urllib.parse.urlsplit(cfg.influx.url).password)
    if problems:
        raise Fatal(EXIT_CONFIG, "; ".join(problems))


def check_data_dir(data_dir: Path) -> None:
    """The outbox's directory exists (or can be made) and takes a write and an fsync, and the outbox's path is a
    file (or nothing yet)."""
    probe = data_dir / f".write-check-{os.getpid()}"
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        with probe.open("wb") as handle:
            handle.write(b"ok")
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as exc:
        with contextlib.suppress(OSError):
            probe.unlink()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT) and (data_dir / OUTBOX_FILE).is_file():
            # A full disk is a state the gateway runs through (records wait in memory, the storage alarm says so),
            # not a reason to stop: an existing outbox opens without space.
            log.error("gateway.data_dir %s is full (%s): starting with records in memory only", data_dir, exc.strerror)
            return
        raise Fatal(
            EXIT_STORAGE,
            f"gateway.data_dir {data_dir} is not a writable directory ({exc.strerror or exc}) -> create it and give "
            "the gateway's user write access to it (systemd: StateDirectory=; compose: the outbox volume)",
        ) from None
    outbox = data_dir / OUTBOX_FILE
    if outbox.exists() and not outbox.is_file():
        raise Fatal(EXIT_STORAGE, f"outbox {outbox} is not a file -> move it out of gateway.data_dir")


def preflight(cfg: Config) -> None:
    """Everything `run` can check before it opens a port; raises Fatal."""
    check_secrets(cfg)
    check_data_dir(cfg.gateway.data_dir)


def storage_fatal(outbox: Path, exc: BaseException) -> Fatal:
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror
    return Fatal(
        EXIT_STORAGE,
        f"outbox {outbox} unusable: {reason} -> check free disk space and write access to {outbox.parent} "
        "(what is owed stays in the outbox)",
    )


def task_fatal(task: str, exc: BaseException | None, outbox: Path) -> Fatal:
    """What a gateway task that stopped means for the process."""
    if exc is None:
        return Fatal(EXIT_INTERNAL, f"task {task} ended unexpectedly -> a bug: report it; a restart resumes")
    if isinstance(exc, Fatal):
        return exc
    if isinstance(exc, ConfigError):
        return Fatal(EXIT_CONFIG, "; ".join(exc.problems))
    if isinstance(exc, sqlite3.Error) or task == "outbox":
        return storage_fatal(outbox, exc)
    return Fatal(EXIT_INTERNAL, f"task {task} failed: {exc!r} -> a bug: report it; a restart resumes")
