"""Pack names and semantic versions: validation and ordering (semver.org 2.0.0 precedence).

The patterns live in the format module (savpack_runtime.format); this is where they are enforced: at build, before
the model runs, and by registries, which store packs under name/version paths.
"""

from __future__ import annotations

import re
from typing import Iterable

from savpack_runtime import format as fmt

from .errors import IdentityError

LATEST = "latest"
_NAME = re.compile(fmt.NAME_PATTERN)
_VERSION = re.compile(fmt.VERSION_PATTERN)


def check_name(name: str, what: str = "pack name") -> str:
    if not (_NAME.fullmatch(name) and len(name) <= fmt.NAME_MAX_CHARS):
        raise IdentityError(
            f"{what} {name!r} is not valid: use letters, digits, '.', '_' and '-', optionally one 'org/' prefix, "
            f"starting with a letter or digit, at most {fmt.NAME_MAX_CHARS} characters (e.g. team/safety-classifier)"
        )
    return name


def check_version(version: str, what: str = "pack version") -> str:
    if "+" in version and _VERSION.fullmatch(version.split("+", 1)[0]):
        raise IdentityError(f"{what} {version!r}: build metadata ('+...') is not allowed, as it does not change the "
                            "version's precedence; use a pre-release ('-rc.1') or a new patch version")
    if not (_VERSION.fullmatch(version) and len(version) <= fmt.VERSION_MAX_CHARS):
        raise IdentityError(f"{what} {version!r} is not a semantic version MAJOR.MINOR.PATCH[-PRERELEASE] (e.g. 1.2.0 or 2.0.0-rc.1)")
    return version


def version_key(version: str) -> tuple:
    """Sort key giving semver precedence: 1.0.0-alpha < 1.0.0-alpha.1 < 1.0.0-beta < 1.0.0 < 1.0.1 < 1.10.0."""
    check_version(version)
    core, _, prerelease = version.partition("-")
    major, minor, patch = (int(part) for part in core.split("."))
    if not prerelease:
        return (major, minor, patch, 1, ())
    # Numeric identifiers sort numerically and below alphanumeric ones; a longer list wins when the prefix is equal.
    identifiers = tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in prerelease.split("."))
    return (major, minor, patch, 0, identifiers)


def latest(versions: Iterable[str]) -> str | None:
    """The highest release version; the highest pre-release only when there is no release."""
    versions = list(versions)
    releases = [version for version in versions if "-" not in version]
    candidates = releases or versions
    return max(candidates, key=version_key) if candidates else None


def sorted_versions(versions: Iterable[str]) -> list[str]:
    return sorted(versions, key=version_key)
