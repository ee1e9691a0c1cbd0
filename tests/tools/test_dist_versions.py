"""The Debian spelling of our versions keeps their order, as dpkg itself compares them."""

from __future__ import annotations

import itertools
import subprocess

import pytest

from tools.dist.versions import debian_version

# Oldest first, as PEP 440 orders them.
ORDERED = ["0.3.0.dev0", "0.3.0.dev0+upgrade1", "0.3.0rc1", "0.3.0", "0.3.0.post1.dev0", "0.3.0.post1",
           "0.3.1a1", "0.3.1b2", "0.3.1", "1.0.0"]
# A local label sorts after its public version and before the next release (its order against a .postN of the
# same release is not kept: Debian has one "+" for both).
LOCAL = ["0.3.0", "0.3.0+site1", "0.3.1a1"]


@pytest.mark.parametrize(("pep440", "debian"), [
    ("0.3.0.dev0", "0.3.0~dev0-1"), ("1.2.0rc1", "1.2.0~rc1-1"), ("1.2.0.post1", "1.2.0+post1-1"),
    ("0.3.0.dev0+upgrade1", "0.3.0~dev0+upgrade1-1"), ("2.0.0", "2.0.0-1")])
def test_each_pep440_version_has_its_debian_spelling(pep440: str, debian: str) -> None:
    assert debian_version(pep440) == debian


@pytest.mark.parametrize("versions", [ORDERED, LOCAL], ids=["releases", "local"])
def test_dpkg_orders_the_debian_versions_as_pep440_orders_ours(versions: list[str]) -> None:
    for older, newer in itertools.pairwise(versions):
        result = subprocess.run(["dpkg", "--compare-versions", debian_version(older), "lt", debian_version(newer)])
        assert result.returncode == 0, f"{debian_version(older)} is not older than {debian_version(newer)}"


@pytest.mark.parametrize("bad", ["0.3", "v0.3.0", "0.3.0-1", "0.3.0.DEV0", "0.3.0_1", ""])
def test_a_version_that_is_not_normalized_pep440_is_refused(bad: str) -> None:
    if bad == "0.3":
        assert debian_version(bad) == "0.3-1"  # fewer parts are still a release
        return
    with pytest.raises(ValueError, match="PEP 440"):
        debian_version(bad)
