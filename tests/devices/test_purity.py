"""devices/ stays pure: no I/O library is imported there, so drivers run the same on a port, a file or a test."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import devices

FORBIDDEN = {
    "asyncio",
    "serial",
    "serial_asyncio_fast",
    "socket",
    "aiomqtt",
    "paho",
    "influxdb_client",
    "aiohttp",
    "http",
    "urllib",
    "requests",
    "subprocess",
    "os",
    "threading",
    "time",
}
MODULES = sorted(Path(devices.__file__).parent.glob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[p.name for p in MODULES])
def test_device_module_imports_no_io(path: Path) -> None:
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & FORBIDDEN, f"{path.name} imports {sorted(imported & FORBIDDEN)}"
