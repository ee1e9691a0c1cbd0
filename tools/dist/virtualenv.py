"""The virtualenv a package installs under /opt/onprem/, built from wheels on the build machine.

Installing a .deb needs no network and no compiler: every dependency arrives here as a wheel (`pip download`,
from PyPI or pip's cache, for this machine's Python and platform), and the virtualenv is built in a work folder
with Debian's own interpreter (/usr/bin/python3.X, which the package then depends on). A virtualenv is not
relocatable as such: its scripts' shebangs, pyvenv.cfg and the activate scripts name the folder it was made in.
`place` copies it to its package's staging tree and rewrites those names to the final prefix, and refuses a
tree in which the build folder's name is left anywhere else, so no installed file points into the builder's
/tmp. No byte-code is built here: the package's postinst compiles it in place, as Debian's py3compile does.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

#: The interpreter the virtualenvs run on: Debian's, of the builder's Python version (its wheels' ABI).
SYSTEM_PYTHON = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"


def clean_env() -> dict[str, str]:
    """The environment for pip and the new interpreter, without a PYTHONPATH: a checkout on it would make the
    project look installed already (its egg-info), and pip would leave it out of the virtualenv."""
    return {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}


def download_wheels(wheel: Path, wheelhouse: Path) -> Path:
    """The project's wheel and a wheel of each of its dependencies, in `wheelhouse`."""
    wheelhouse.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                    "--only-binary=:all:", "--dest", str(wheelhouse), str(wheel)],
                   check=True, timeout=900, env=clean_env())
    return wheelhouse


def build_virtualenv(wheel: Path, wheelhouse: Path, into: Path) -> Path:
    """A virtualenv at `into` with the project's wheel and its dependencies, from `wheelhouse` alone."""
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(into)], check=True, timeout=120, env=clean_env())
    subprocess.run([sys.executable, "-m", "pip", "--python", str(into / "bin" / "python"), "install", "-q",
                    "--disable-pip-version-check", "--no-index", "--find-links", str(wheelhouse),
                    "--no-compile", "--no-warn-script-location", str(wheel)],
                   check=True, timeout=900, env=clean_env())
    # No headers to compile against: venv's empty include/ would only be an empty folder in the package.
    include = into / "include"
    if include.is_dir() and not any(p.is_file() for p in include.rglob("*")):
        shutil.rmtree(include)
    # The record of where the wheel was installed from names a file in the builder's /tmp.
    for direct_url in (into / "lib").glob("python3*/site-packages/onprem-*.dist-info/direct_url.json"):
        direct_url.unlink()
        record = direct_url.parent / "RECORD"
        gone = f"{direct_url.parent.name}/{direct_url.name},"
        record.write_text("".join(line for line in record.read_text().splitlines(keepends=True)
                                  if not line.startswith(gone)))
    return into


def place(built: Path, staging_root: Path, prefix: str) -> Path:
    """Copy the virtualenv `built` to `prefix` (e.g. /opt/onprem/agent) under `staging_root`."""
    target = staging_root / prefix.lstrip("/")
    shutil.copytree(built, target, symlinks=True)
    old, new = os.fsencode(str(built)), os.fsencode(prefix)
    leftovers, rewritten = [], []
    for path in sorted(target.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if old not in data:
            continue
        if path.parent.name == "bin" or path.name == "pyvenv.cfg":
            path.write_bytes(data.replace(old, new))
            rewritten.append(path)
        else:
            leftovers.append(path)
    if leftovers:
        raise RuntimeError(f"the build folder {built} is named in files that cannot be rewritten: {leftovers[:5]}")
    _update_records(target, rewritten)
    return target


def _record_hash(path: Path) -> str:
    digest = hashlib.sha256(path.read_bytes()).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _update_records(target: Path, rewritten: list[Path]) -> None:
    """The hashes and sizes in the distributions' RECORD files of the scripts just rewritten: they held the
    build folder's (random) name, so the package's RECORDs are right and the same from one build to the next."""
    rewritten_set = {path.resolve() for path in rewritten}
    for record in target.glob("lib/python3*/site-packages/*.dist-info/RECORD"):
        site = record.parent.parent
        lines = []
        for line in record.read_text().splitlines():
            name, _, _rest = line.partition(",")
            path = (site / name).resolve()
            if path in rewritten_set:
                line = f"{name},{_record_hash(path)},{path.stat().st_size}"
            lines.append(line)
        record.write_text("\n".join(lines) + "\n")
