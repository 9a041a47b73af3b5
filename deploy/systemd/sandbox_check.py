"""What the unit's sandbox does to the gateway process itself, without systemd: a manual check (docs/operations.md).

The test machines have no systemd as PID 1, so the unit is never started there; tests/deploy/test_systemd.py scores
it offline. This puts a process under the unit's per-process restrictions and runs it:
  SystemCallFilter=@system-service ~@privileged ~@resources, SystemCallErrorNumber=EPERM, SystemCallArchitectures=
  native (a libseccomp filter from the groups as `systemd-analyze syscall-filter` expands them on this machine),
  MemoryDenyWriteExecute (the kernel's PR_SET_MDWE, Linux 6.3+), NoNewPrivileges, UMask=0077, LimitNOFILE=4096.
Not covered: the mount and device restrictions (ProtectSystem, ProtectProc, ProcSubset, PrivateTmp, DevicePolicy),
the user, the capabilities and the namespaces.

Two uses, with Debian's python3 and its python3-seccomp package (not a project dependency):
  /usr/bin/python3 deploy/systemd/sandbox_check.py COMMAND...      run COMMAND sandboxed
  PYTHONPATH=deploy/systemd:. .venv/bin/pytest -p sandbox_check tests/integration/...
      every gateway the tests start through tests.helpers.start_gateway runs sandboxed (SANDBOX_LOG=FILE lists them)
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

SYSTEM_PYTHON = "/usr/bin/python3"  # the one with python3-seccomp
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_MDWE = 65
_PR_MDWE_REFUSE_EXEC_GAIN = 1


def expand(group: str) -> set[str]:
    """The system calls of a `@group`, nested groups expanded, as this machine's systemd defines them."""
    listing = subprocess.run(
        ["systemd-analyze", "syscall-filter", group], capture_output=True, text=True, check=True
    ).stdout
    names: set[str] = set()
    for line in listing.splitlines()[1:]:
        word = line.strip()
        if word and not word.startswith("#"):
            names |= expand(word) if word.startswith("@") else {word}
    return names


def sandbox_and_exec(command: list[str]) -> None:
    import seccomp  # type: ignore[import-not-found]  # Debian's python3-seccomp, only in this mode

    allowed = expand("@system-service") - expand("@privileged") - expand("@resources")
    syscalls = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM))  # native architecture only
    foreign: list[str] = []  # names systemd knows that are no system call of this architecture (logged below)
    for name in sorted(allowed):
        try:
            syscalls.add_rule(seccomp.ALLOW, name)
        except (RuntimeError, ValueError, OSError):
            foreign.append(name)
    os.umask(0o077)
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        sys.exit(f"prctl(PR_SET_NO_NEW_PRIVS) failed: errno {ctypes.get_errno()}")
    if libc.prctl(_PR_SET_MDWE, _PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        sys.exit(f"prctl(PR_SET_MDWE) failed: errno {ctypes.get_errno()} (Linux 6.3 or later needed)")
    log = os.environ.get("SANDBOX_LOG")
    if log:
        with open(log, "a") as out:
            allowed_here = len(allowed) - len(foreign)
            out.write(f"{os.getpid()} sandboxed ({allowed_here} system calls allowed): {' '.join(command)}\n")
            out.write(f"  not system calls here, skipped: {' '.join(foreign) or 'none'}\n")
    syscalls.load()
    os.execvp(command[0], command)


def pytest_collection_finish(session: Any) -> None:
    """As a pytest plugin: every test module's start_gateway starts the gateway under this sandbox."""
    import tests.helpers as helpers

    original = helpers.start_gateway

    def start_gateway(config: Path, log: Path | None = None) -> subprocess.Popen[bytes]:
        command = [SYSTEM_PYTHON, __file__, sys.executable, "-m", "gateway", "run", "--config", str(config)]
        return subprocess.Popen(
            command,
            stdout=subprocess.PIPE if log is None else subprocess.DEVNULL,
            stderr=subprocess.STDOUT if log is None else log.open("ab"),
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    for module in list(sys.modules.values()):
        if getattr(module, "start_gateway", None) is original:
            setattr(module, "start_gateway", start_gateway)  # noqa: B010  # a module attribute, replaced


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sandbox_and_exec(sys.argv[1:])
