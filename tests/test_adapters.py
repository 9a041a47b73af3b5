"""One adapter per outside library: each is imported by the module(s) named here and nowhere else in the tree
(`gateway`, `devices`, `simulators`, `dashboards`, `clients`, `devtools`), so its errors are turned into ours in one
place. Benchmarks that measure a library's own limits and tests may import them directly."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = ("gateway", "devices", "simulators", "dashboards", "clients", "devtools")
ADAPTERS: dict[str, set[str]] = {
    "aiomqtt": {"gateway/sinks/mqtt.py"},
    "paho": set(),
    # HTTP to InfluxDB (the sink's writes and pings, the clock check against its Date header) is the standard
    # library's http.client in gateway/sinks/influx.py: neither library is a runtime dependency (tests use both).
    "influxdb_client": set(),
    "aiohttp": set(),
    "serial": {"gateway/serial_port.py"},
    "serial_asyncio_fast": {"gateway/serial_port.py"},
    "grafana_client": {"dashboards/push.py"},
    "grafana_foundation_sdk": {"dashboards/build.py"},
    "apprise": {"gateway/sinks/notify.py"},
}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_each_outside_library_is_imported_by_its_adapter_only() -> None:
    wrong: list[str] = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            where = path.relative_to(ROOT).as_posix()
            for library in imported_roots(path) & ADAPTERS.keys():
                if where not in ADAPTERS[library]:
                    wrong.append(f"{where} imports {library} (its adapter: {', '.join(sorted(ADAPTERS[library]))})")
    assert not wrong, "\n".join(wrong)
