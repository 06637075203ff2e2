"""One compatibility rule for every versioned file: newer versions ask for an upgrade, older ones never do."""

from __future__ import annotations

import pytest

from savpack_runtime.compat import version_refusal


def test_supported_versions_pass():
    assert version_refusal(1, (1,), "pack format version", "savpack-runtime") is None
    assert version_refusal(2, (1, 2), "pack format version", "savpack-runtime") is None


def test_a_newer_version_names_both_versions_and_the_upgrade():
    message = version_refusal(3, (1, 2), "bundle format version", "savpack-runtime")
    assert message == "bundle format version 3 is newer than this reader's 2; upgrade with: pip install --upgrade savpack-runtime"


@pytest.mark.parametrize("version", [0, 2])
def test_an_older_or_retired_version_does_not_tell_the_user_to_upgrade(version):
    message = version_refusal(version, (1, 3), "registry format version", "savpack")
    assert "upgrade" not in message
    assert message == f"registry format version {version} is not supported: this savpack reads version(s) [1, 3], an earlier release wrote it"
