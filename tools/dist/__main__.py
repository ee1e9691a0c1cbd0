"""`python -m tools.dist [--version V] [--out dist]`: what `make dist` runs (see tools/dist/__init__.py).

The version defaults to pyproject.toml's; `--version` (or DIST_VERSION) builds the same code as another
version, e.g. the newer one the packaging test upgrades to.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tools.dist.debian import PACKAGES, BuiltPackage, build_deb, stage_package
from tools.dist.python_dists import PythonDists, build_python_dists
from tools.dist.versions import check_version, debian_version, source_date
from tools.dist.virtualenv import build_virtualenv, download_wheels

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Dist:
    python: PythonDists
    debs: tuple[BuiltPackage, ...]


def build_all(out: Path, version: str | None = None, root: Path = ROOT, wheelhouse: Path | None = None) -> Dist:
    """The wheel, the sdist and both .debs into `out`. A `wheelhouse` given is kept, and reused by later builds
    (the dependencies' wheels do not change with our version)."""
    with tempfile.TemporaryDirectory(prefix="onprem-dist-") as scratch:
        work = Path(scratch)
        when = source_date(root)
        dists = build_python_dists(root, out, work / "python", version, when)
        wheels = download_wheels(dists.wheel, wheelhouse or work / "wheels")
        venv = build_virtualenv(dists.wheel, wheels, work / "venv")
        debs = tuple(BuiltPackage(spec, debian_version(dists.version),
                                  build_deb(stage_package(root, spec, dists.version, venv, work / "stage", when),
                                            out, when))
                     for spec in PACKAGES)
    return Dist(dists, debs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.dist", description=__doc__.splitlines()[0])
    parser.add_argument("--version", type=check_version, default=os.environ.get("DIST_VERSION") or None,
                        help="build as this PEP 440 version (default: pyproject.toml's; $DIST_VERSION)")
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="where the files go (default: dist/)")
    args = parser.parse_args(argv)
    dist = build_all(args.out, args.version)
    for path in (dist.python.wheel, dist.python.sdist, *(built.deb for built in dist.debs)):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
