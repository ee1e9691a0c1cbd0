"""The two installations the compatibility tests pair: the checkout's, and the last release's.

The release is built from its recorded commit (docs/releases.json) into a virtualenv of its own. Its
dependencies come from the checkout's virtualenv through a path file, so building it needs neither network
nor a second download of grpcio; the release's own code, metadata and console scripts are its own (a path
added by a path file does not run that directory's path files, so the checkout's editable install does not
leak into it).
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import venv
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RELEASES = ROOT / "docs" / "releases.json"


@dataclass(frozen=True)
class Release:
    version: str
    tag: str
    commit: str
    protocol_revisions: tuple[int, ...]


@dataclass(frozen=True)
class Install:
    """Where one version's commands are."""

    version: str
    bin: Path

    def command(self, name: str) -> str:
        return str(self.bin / name)


def last_release() -> Release:
    newest = json.loads(RELEASES.read_text())["releases"][0]
    return Release(newest["version"], newest["tag"], newest["commit"], tuple(newest["protocol_revisions"]))


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout


def has_commit(commit: str) -> bool:
    return subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{commit}^{{commit}}"],
                          capture_output=True).returncode == 0


def checkout_install() -> Install:
    from onprem.tunnel.version import installed_version

    return Install(installed_version(), Path(sys.executable).parent)


def build_release(release: Release, into: Path) -> Install:
    """The release's code from git, built as a wheel and installed into a virtualenv under `into`."""
    source = into / "source"
    source.mkdir(parents=True)
    with tempfile.TemporaryFile() as archive:
        subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", release.commit], stdout=archive, check=True)
        archive.seek(0)
        with tarfile.open(fileobj=archive) as tar:
            tar.extractall(source, filter="tar")
    wheels = into / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(source)], check=True, capture_output=True, timeout=300)
    [wheel] = wheels.glob("onprem-*.whl")
    env_dir = into / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "checkout_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True, timeout=300)
    return Install(release.version, env_dir / "bin")
