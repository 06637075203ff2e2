"""The lock (requirements/lock.txt, made by scripts/lock) covers every dependency, and the versions README.md and
docs/families.md say the families were tested with are the lock's."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTED_WITH = re.compile(r"transformers (\S+), torch ([0-9][^\s,]*)(?:, num2words ([0-9][^\s,]*))?")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonical(name)] = version
    return pins


def requirement_names(pyproject: Path) -> set[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project.get("dependencies", []))
    for extra, extra_requirements in project.get("optional-dependencies", {}).items():
        if extra != "gpu":  # onnxruntime-gpu replaces onnxruntime; the lock is for the CPU install (scripts/lock)
            requirements += extra_requirements
    return {canonical(re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0]) for requirement in requirements}


def test_every_declared_dependency_is_locked():
    pins = locked()
    declared = requirement_names(ROOT / "pyproject.toml") | requirement_names(ROOT / "runtime" / "pyproject.toml")
    declared -= {"savpack-runtime"}  # installed from the repository, editable
    missing = sorted(declared - set(pins))
    assert not missing, f"declared but not in requirements/lock.txt (run bash scripts/lock): {missing}"


def test_tested_with_versions_are_the_locked_ones():
    pins = locked()
    cells = []
    for doc in ("README.md", "docs/families.md"):
        cells += [(doc, match) for match in TESTED_WITH.finditer((ROOT / doc).read_text())]
    assert len(cells) >= 10
    for doc, match in cells:
        transformers, torch, num2words = match.groups()
        assert transformers == pins["transformers"], (doc, match.group(0))
        assert torch == pins["torch"], (doc, match.group(0))
        if num2words:
            assert num2words == pins["num2words"], (doc, match.group(0))
