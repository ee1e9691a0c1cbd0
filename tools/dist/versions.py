"""The project's version (pyproject.toml, or an override) and the same version spelled for Debian.

PEP 440 and Debian order pre-releases differently: `0.3.0.dev0` comes before `0.3.0` in both, but Debian
needs a tilde to say so (`0.3.0~dev0` < `0.3.0`). The mapping keeps the order of the versions we publish:
aN, bN, rcN and .devN become ~aN, ~bN, ~rcN and ~devN, .postN becomes +postN, a local label +x stays +x
(after its public version and before the next, but not ordered against a .postN of the same release).
Every package gets the Debian revision 1: a new package is a new upstream version (the packaging lives in
this repository and changes with it).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import tomllib
from pathlib import Path

DEBIAN_REVISION = "1"

_PEP440 = re.compile(
    r"^(?P<release>\d+(?:\.\d+)*)(?P<pre>(?:a|b|rc)\d+)?(?:\.post(?P<post>\d+))?(?:\.dev(?P<dev>\d+))?"
    r"(?:\+(?P<local>[a-z0-9]+(?:\.[a-z0-9]+)*))?$")


def project_version(root: Path) -> str:
    """The version in pyproject.toml."""
    return str(tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"])


def check_version(version: str) -> str:
    """`version` if it is a normalized PEP 440 version we can spell for Debian; ValueError otherwise."""
    if not _PEP440.match(version):
        raise ValueError(f"{version!r} is not a normalized PEP 440 version such as 0.3.0, 0.3.1rc1, "
                         f"0.3.0.dev2 or 0.3.0+site1")
    return version


def debian_version(version: str) -> str:
    """e.g. 0.3.0.dev0 -> 0.3.0~dev0-1, 1.2.0rc1 -> 1.2.0~rc1-1, 1.2.0.post1 -> 1.2.0+post1-1."""
    match = _PEP440.match(check_version(version))
    assert match is not None
    upstream = match["release"]
    if match["pre"]:
        upstream += "~" + match["pre"]
    if match["post"]:
        upstream += "+post" + match["post"]
    if match["dev"]:
        upstream += "~dev" + match["dev"]
    if match["local"]:
        upstream += "+" + match["local"]
    return f"{upstream}-{DEBIAN_REVISION}"


def source_date(root: Path) -> float:
    """The time of the checkout's last commit (SOURCE_DATE_EPOCH if set), or now outside git."""
    if "SOURCE_DATE_EPOCH" in os.environ:
        return float(os.environ["SOURCE_DATE_EPOCH"])
    result = subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%ct"], capture_output=True, text=True)
    return float(result.stdout.strip()) if result.returncode == 0 and result.stdout.strip() else time.time()
