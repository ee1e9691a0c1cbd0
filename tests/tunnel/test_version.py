"""`--version`: each command names itself, the installed version and the tunnel protocol revisions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from onprem.tunnel.protocol import SUPPORTED_REVISIONS
from onprem.tunnel.version import installed_version, version_line

BIN = Path(sys.executable).parent


def test_the_version_is_the_installed_distributions() -> None:
    from importlib.metadata import version

    assert installed_version() == version("onprem")


def test_the_version_line_names_the_program_the_version_and_the_revisions() -> None:
    assert SUPPORTED_REVISIONS == (1,)
    assert version_line("onprem-agent") == f"onprem-agent {installed_version()} (tunnel protocol revision 1)"


@pytest.mark.parametrize("program", ["onprem-control-plane", "onprem-agent", "onprem"])
def test_each_command_prints_its_version_line_and_exits_0(program: str) -> None:
    out = subprocess.run([str(BIN / program), "--version"], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout.strip()) == (0, version_line(program))


def test_the_agent_and_the_control_plane_report_the_same_version() -> None:
    from onprem.agent import __version__ as agent_version
    from onprem.control_plane import __version__ as cp_version

    assert agent_version == cp_version == installed_version()
