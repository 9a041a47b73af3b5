"""The image is built from requirements.lock (issue 18, finding 8): every runtime dependency of pyproject.toml is
pinned there with hashes, at a version pyproject allows, and every third-party package the shipped code imports is
declared. After changing [project] dependencies, `make lock` (one command, uv from PyPI) brings the lock up to date.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).parent.parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
LOCK = REPO / "requirements.lock"
SHIPPED = ("gateway", "devices", "simulators", "dashboards", "devtools", "clients")  # the packages of the wheel


def locked() -> dict[str, tuple[Version, int]]:
    """name -> (pinned version, number of hashes) of every entry of the lock."""
    entries: dict[str, tuple[Version, int]] = {}
    text = LOCK.read_text()
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        head = re.match(r"([A-Za-z0-9._-]+)==(\S+)", block)
        if head:
            entries[canonicalize_name(head.group(1))] = (Version(head.group(2)), block.count("--hash=sha256:"))
    return entries


def declared() -> list[Requirement]:
    return [Requirement(spec) for spec in PYPROJECT["project"]["dependencies"]]


def test_every_runtime_dependency_is_locked_with_hashes_at_an_allowed_version() -> None:
    pins = locked()
    missing = [str(r) for r in declared() if canonicalize_name(r.name) not in pins]
    assert not missing, f"not in requirements.lock: {missing}: run `make lock`"
    for requirement in declared():
        version, hashes = pins[canonicalize_name(requirement.name)]
        assert requirement.specifier.contains(version, prereleases=True), f"{requirement}: locked at {version}"
        assert hashes > 0
    assert all(hashes > 0 for _, hashes in pins.values()), "a pin without a hash: pip --require-hashes refuses it"


def test_the_build_backend_is_locked_too() -> None:
    """The Dockerfile installs the project with --no-build-isolation --no-index: its build backend comes from the
    lock, through deploy/build-requirements.in, which repeats [build-system] requires."""
    build = [line for line in (REPO / "deploy" / "build-requirements.in").read_text().splitlines() if line.strip()]
    assert sorted(build) == sorted(PYPROJECT["build-system"]["requires"])
    pins = locked()
    for spec in build:
        requirement = Requirement(spec)
        assert requirement.specifier.contains(pins[canonicalize_name(requirement.name)][0])


def test_the_image_installs_only_the_lock() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "pip install --require-hashes --no-deps -r requirements.lock" in dockerfile
    assert "pip install --no-deps --no-build-isolation --no-index ." in dockerfile
    assert "make lock" in LOCK.read_text().splitlines()[1]


def imported_top_levels(package: str) -> set[str]:
    names: set[str] = set()
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_every_imported_package_is_declared() -> None:
    """A third-party import in shipped code must be a declared dependency itself, not something that happens to come
    with one (aiohttp was imported and undeclared)."""
    first_party = set(SHIPPED)
    distributions = importlib.metadata.packages_distributions()
    names = {canonicalize_name(r.name) for r in declared()}
    undeclared = {}
    for package in SHIPPED:
        for module in imported_top_levels(package) - first_party - set(sys.stdlib_module_names) - {"__future__"}:
            owners = {canonicalize_name(d) for d in distributions.get(module, [])}
            assert owners, f"{package} imports {module}, which no installed distribution provides"
            if not owners & names:
                undeclared[f"{package}: {module}"] = sorted(owners)
    assert not undeclared, f"imported but not in [project] dependencies: {undeclared}"
