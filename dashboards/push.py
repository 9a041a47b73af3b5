"""Upload the dashboards to an existing Grafana: the only module that imports grafana-client.

`push` creates the folder when it is missing and upserts each dashboard (`overwrite: true`, by uid), so pushing
twice gives the same result. Every failure (refused token, unreachable server, an answer Grafana should not give)
comes out as one `GrafanaPushError` naming the step and the server's message.

`main_build` and `main_push` are the bodies of `infusion-telemetry dashboards build|push`: they load the alarm
profile from a gateway config (or use the shipped example profile when there is none).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

from grafana_client.api import GrafanaApi
from grafana_client.client import GrafanaException

from dashboards.build import GENERATED_DIR, HEARTBEAT_STALE_S, build_all, write_all
from gateway.alarms import EXAMPLE_KETAMINE_PROFILE, AlarmProfile
from gateway.config import ConfigError, load_config

DEFAULT_FOLDER = "Infusion rooms"
TIMEOUT_S = 10.0


class GrafanaPushError(Exception):
    """Grafana refused or could not be reached. str() says which step, which server, and why."""


def _folder_uid(title: str) -> str:
    """A stable uid for our folder, so the same folder is found again whatever its id on that server."""
    return (re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "folder")[:40]


def _explain(exc: Exception) -> str:
    if isinstance(exc, GrafanaException):
        status = exc.status_code
        if status in (401, 403):
            return f"refused the token ({status} {exc.message}): check --token (a service account token, Editor)"
        return f"answered {status}: {exc.message}" if status else f"failed: {exc.message}"
    return f"is unreachable: {exc}"


def push(url: str, token: str, dashboards: dict[str, dict[str, Any]], folder: str = DEFAULT_FOLDER) -> list[str]:
    """Create `folder` if missing and upsert every dashboard into it. Returns each dashboard's URL on that Grafana.

    Raises GrafanaPushError on any failure (the dashboards pushed before it stay pushed: each is a whole upsert).
    """
    if not token:
        raise GrafanaPushError("no Grafana token: give a service account token (--token or GRAFANA_TOKEN)")
    base = url.rstrip("/")
    # grafana-client is not annotated; its objects are handled as Any here, its only caller.
    api: Any = GrafanaApi.from_url(base, credential=token, timeout=TIMEOUT_S)
    step = "listing folders"
    try:
        existing = [f for f in api.folder.get_all_folders() or [] if f.get("title") == folder]
        if existing:
            folder_uid = str(existing[0]["uid"])
        else:
            step = f"creating folder {folder!r}"
            created = api.folder.create_folder(folder, uid=_folder_uid(folder))
            folder_uid = str(created["uid"])
        urls = []
        for name, board in dashboards.items():
            step = f"uploading dashboard {name!r} ({board.get('uid')})"
            payload = {
                "dashboard": {**board, "id": None},
                "folderUid": folder_uid,
                "overwrite": True,
                "message": "infusion-telemetry dashboards push",
            }
            answer = api.dashboard.update_dashboard(payload) or {}
            urls.append(base + str(answer.get("url") or f"/d/{board.get('uid')}"))
        return urls
    except (GrafanaException, OSError) as exc:  # niquests' connection errors are OSErrors
        raise GrafanaPushError(f"Grafana at {base} {_explain(exc)} (while {step})") from exc


def load_profile(config_path: Path | None) -> AlarmProfile:
    """The alarm profile of a gateway config, or the shipped example profile when there is no config."""
    if config_path is None:
        return EXAMPLE_KETAMINE_PROFILE
    config = load_config(config_path)
    if (interval := config.gateway.status_interval_s) * 3 > HEARTBEAT_STALE_S:
        print(
            f"warning: gateway.status_interval_s = {interval:g}: the wall calls a gateway OFFLINE after "
            f"{HEARTBEAT_STALE_S} s without a heartbeat; keep the interval at {HEARTBEAT_STALE_S / 3:g} s or less",
            file=sys.stderr,
        )
    return config.alarms.build()


def main_build(config_path: Path | None, out_dir: Path = GENERATED_DIR) -> int:
    """`dashboards build`: write the dashboards' JSON for the config's alarm profile. Exit status."""
    try:
        profile = load_profile(config_path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    for path in write_all(out_dir, profile):
        print(path)
    if profile.example:
        print(f"alarm profile {profile.name!r}: an EXAMPLE, not advice", file=sys.stderr)
    return 0


def main_push(config_path: Path | None, url: str, token: str) -> int:
    """`dashboards push`: upload the dashboards for the config's alarm profile. An empty token falls back to
    the GRAFANA_TOKEN environment variable (a token on the command line shows in the process list)."""
    try:
        profile = load_profile(config_path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        urls = push(url, token or os.environ.get("GRAFANA_TOKEN", ""), build_all(profile))
    except GrafanaPushError as exc:
        print(f"dashboards push: {exc}", file=sys.stderr)
        return 1
    for pushed in urls:
        print(pushed)
    return 0
