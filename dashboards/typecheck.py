"""Type-check the generated dashboards against Grafana's published dashboard schema (`make check-dashboards`).

The npm package `@grafana/schema` (pinned in dashboards/.typecheck/package.json, the Grafana version of the compose
image) ships the TypeScript types of a dashboard and of each panel plugin's options. This writes every generated
dashboard, and every panel of it, as an object literal that `satisfies` those types (dashboards/.typecheck/types.ts)
and runs `tsc --noEmit`: an unknown field name, a wrong shape or an enum value Grafana does not know fails it.
What it cannot see: anything the schema types as free-form (a target's fields, override values, transformations).

    python -m dashboards.typecheck [JSON ...]     (default: dashboards/generated/*.json)

Needs `npm ci --prefix dashboards/.typecheck` once (Makefile: check-dashboards does it); runs offline after that.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from dashboards.build import GENERATED_DIR

HERE = Path(__file__).parent / ".typecheck"
TSC = HERE / "node_modules" / ".bin" / "tsc"
PANEL_TYPES = {
    "stat": "StatPanel",
    "table": "TablePanel",
    "text": "TextPanel",
    "timeseries": "TimeSeriesPanel",
    "state-timeline": "StateTimelinePanel",
    "row": "AnyPanel",
}


def _name(path: Path) -> str:
    return re.sub(r"\W", "_", path.stem)


def source(paths: list[Path]) -> str:
    """The TypeScript that `tsc` checks: each dashboard, and each of its panels by the panel's own type."""
    lines = [
        "// Written by dashboards/typecheck.py from dashboards/generated: do not edit.",
        "import type { AnyPanel, DashboardJson, StatPanel, StateTimelinePanel, TablePanel, TextPanel,",
        "  TimeSeriesPanel } from './types';",
        "",
    ]
    for path in paths:
        board: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        name = _name(path)
        lines.append(f"export const {name} = {json.dumps(board, indent=1)} satisfies DashboardJson;")
        for i, panel in enumerate(board.get("panels") or []):
            kind = PANEL_TYPES.get(str(panel.get("type")))
            if kind is None:  # a panel type this check does not know: a failure, not a silent pass
                kind = f"never /* unknown panel type {panel.get('type')!r} */"
            lines.append(f"export const {name}_panel_{i} = {json.dumps(panel, indent=1)} satisfies {kind};")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    paths = [Path(a) for a in (argv if argv is not None else sys.argv[1:])] or sorted(GENERATED_DIR.glob("*.json"))
    if not TSC.exists():
        print(
            f"dashboards typecheck: {TSC} is missing: run `npm ci --prefix {HERE}` (or `make check-dashboards`)",
            file=sys.stderr,
        )
        return 2
    (HERE / "dashboards.gen.ts").write_text(source(paths), encoding="utf-8")
    done = subprocess.run([str(TSC), "--noEmit", "-p", str(HERE)], check=False, timeout=300)
    if done.returncode == 0:
        print(f"dashboards typecheck: {len(paths)} dashboards match @grafana/schema")
    return done.returncode


if __name__ == "__main__":
    raise SystemExit(main())
