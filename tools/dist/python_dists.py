"""The wheel and the sdist, built from a copy of the checkout (at another version when asked).

A copy, because setuptools leaves build/ and *.egg-info in the tree it builds (and an older layout's leftovers
in build/ would land in the wheel), and because an overridden version is written into the copy's
pyproject.toml: the checkout stays as it was. The build runs setuptools' PEP 517 hooks in the builder's own
environment (no isolation, no download: setuptools is a development dependency).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tools.dist.versions import check_version

# What never goes into a distribution: version control, environments, caches, earlier outputs.
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "var", "*.egg-info", "__pycache__",
                                     ".mypy_cache", ".ruff_cache", ".pytest_cache", "node_modules")
_VERSION_LINE = re.compile(r'^version = "[^"]*"$', re.MULTILINE)

# setuptools prints its progress on stdout: the names built are written to a file of their own.
_BUILD = """
import sys
from pathlib import Path
import setuptools.build_meta as backend
out, names = sys.argv[1], Path(sys.argv[2])
names.write_text(backend.build_sdist(out) + "\\n" + backend.build_wheel(out) + "\\n")
"""


@dataclass(frozen=True)
class PythonDists:
    version: str
    wheel: Path
    sdist: Path


def copy_source(root: Path, into: Path, version: str | None) -> Path:
    """A copy of the checkout's source under `into`, with `version` in its pyproject.toml if given."""
    source = into / "onprem"
    shutil.copytree(root, source, symlinks=True, ignore=_NOT_SOURCE)
    if version is not None:
        pyproject = source / "pyproject.toml"
        text, count = _VERSION_LINE.subn(f'version = "{check_version(version)}"', pyproject.read_text(), count=1)
        if count != 1:
            raise ValueError(f"no version line in {pyproject}")
        pyproject.write_text(text)
    return source


def build_python_dists(root: Path, out: Path, work: Path, version: str | None = None,
                       when: float | None = None) -> PythonDists:
    """Build the sdist and the wheel of the checkout at `root` into `out`; `work` holds the copy. `when` (the
    commit's time) is the time stamp of every file in the wheel, so one commit builds one wheel."""
    source = copy_source(root, work, version)
    out.mkdir(parents=True, exist_ok=True)
    names = work / "built.txt"
    result = subprocess.run([sys.executable, "-c", _BUILD, str(out.resolve()), str(names.resolve())], cwd=source,
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, **({"SOURCE_DATE_EPOCH": str(int(when))} if when else {})})
    if result.returncode != 0:
        raise RuntimeError(f"building the wheel and sdist failed:\n{result.stderr[-4000:]}")
    sdist_name, wheel_name = names.read_text().split()
    wheel = out / wheel_name
    built_version = wheel_name.split("-")[1]
    return PythonDists(built_version, wheel, out / sdist_name)
