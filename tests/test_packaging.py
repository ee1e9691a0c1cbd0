"""The installed distribution claims only names that are ours: everything under ``onprem.``.

A wheel is built from the checkout and unpacked outside it; the console scripts' modules import from there,
and names other software uses (``agent``, ``tools``, ``tunnel``) are not in it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy: setuptools keeps a build/ folder in the source tree, whose leftovers from an
    # older layout would land in the wheel, and the checkout must stay as it was.
    source = tmp_path_factory.mktemp("source") / "onprem"
    shutil.copytree(ROOT, source, symlinks=True,
                    ignore=shutil.ignore_patterns(".git", ".venv", "build", "var", "*.egg-info", "__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(source)], check=True, capture_output=True, timeout=300)
    [built] = out.glob("onprem-*.whl")
    return built


def test_the_wheel_holds_only_the_onprem_package_and_its_metadata(wheel: Path) -> None:
    tops = {name.split("/", 1)[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"onprem", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}


def test_the_wheel_holds_every_part_and_not_the_tools(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("onprem/agent/cli.py", "onprem/control_plane/cli.py", "onprem/operator_cli/main.py",
                   "onprem/tunnel/protocol.py", "onprem/v1/tunnel_pb2.py", "onprem/agent/handlers/__init__.py",
                   "onprem/control_plane/store/migrations/env.py"):
        assert module in names
    assert not [n for n in names if n.startswith(("onprem/tools", "tools/", "tests/", "onprem/tests"))]
    # The store's schema revisions travel with the package: a replica upgrades its database from them.
    assert [n for n in names if n.startswith("onprem/control_plane/store/migrations/versions/r0001")]
    # Server reflection serves the protos' comments from this descriptor set.
    assert "onprem/v1/descriptors.binpb" in names


def test_the_wheel_holds_the_consoles_templates_and_assets(wheel: Path) -> None:
    # Sites run offline: every page, script, style and icon of the console ships in the package.
    names = set(zipfile.ZipFile(wheel).namelist())
    console = "onprem/control_plane/console/"
    assert {n[len(console):] for n in names if n.startswith(console + "static/")} == {
        "static/console.css", "static/console.js", "static/favicon.svg"}
    templates = {n[len(console) + len("templates/"):] for n in names if n.startswith(console + "templates/")}
    assert templates == {p.name for p in (ROOT / "control_plane" / "console" / "templates").glob("*.html")}
    assert {"base.html", "login.html", "fleet.html", "agents.html", "activity.html"} <= templates


def test_the_console_scripts_point_into_onprem(wheel: Path) -> None:
    [entry_points] = [n for n in zipfile.ZipFile(wheel).namelist() if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "onprem-agent = onprem.agent.cli:main" in text
    assert "onprem-control-plane = onprem.control_plane.cli:main" in text
    assert "onprem = onprem.operator_cli.main:main" in text


def test_the_unpacked_wheel_imports_from_itself_outside_the_checkout(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = ("import importlib.util, onprem.agent.cli, onprem.control_plane.cli, onprem.operator_cli.main;"
             "from onprem.control_plane.console.app import load_static;"
             "from onprem.control_plane.console.render import Renderer;"
             "assert sorted(load_static()) == ['console.css', 'console.js', 'favicon.svg'];"
             "Renderer();"
             "from onprem.control_plane.api.reflection import Descriptors;"
             "assert 'onprem.v1.QueryRequest' in Descriptors.load().symbols;"
             "print(onprem.agent.cli.__file__);"
             "print([n for n in ('agent', 'tools', 'tunnel', 'control_plane') if importlib.util.find_spec(n)])")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(site)},
                            capture_output=True, text=True, timeout=60, check=True)
    module_file, foreign = result.stdout.splitlines()
    assert Path(module_file).is_relative_to(site)
    assert foreign == "[]"
