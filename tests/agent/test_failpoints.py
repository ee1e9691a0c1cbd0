"""Failpoints: off unless a test arms them; a misspelt one is refused, not ignored."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from onprem.agent import failpoints


@pytest.fixture(autouse=True)
def disarmed() -> Iterator[None]:
    yield
    failpoints.load("")


def test_an_empty_spec_arms_nothing() -> None:
    assert failpoints.load("") == {}


def test_a_spec_arms_each_named_point() -> None:
    assert failpoints.load("database.after_commit=exit, apps.before_request=exit") == {
        "database.after_commit": "exit", "apps.before_request": "exit"}


def test_an_unknown_point_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match=re.escape("'database.after_comit=exit' is not one of")):
        failpoints.load("database.after_comit=exit")


def test_an_unknown_action_is_refused() -> None:
    with pytest.raises(ValueError, match=re.escape("'files.after_rename=sleep' is not one of")):
        failpoints.load("files.after_rename=sleep")


def test_an_unarmed_point_does_nothing() -> None:
    failpoints.load("apps.after_response=exit")
    failpoints.hit("database.after_commit")  # still here


def test_an_armed_point_ends_the_process_with_the_failpoint_status() -> None:
    code = ("from onprem.agent import failpoints; failpoints.load('files.after_rename=exit'); "
            "failpoints.hit('files.after_rename'); print('survived')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (failpoints.EXIT_STATUS, "")


def test_the_agent_refuses_to_start_with_a_misspelt_failpoint() -> None:
    agent = Path(sys.executable).parent / "onprem-agent"
    done = subprocess.run([str(agent), "run", "--config", "/nonexistent.toml"],
                          capture_output=True, text=True, timeout=60,
                          env={"ONPREM_FAILPOINTS": "files.after_renam=exit", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2
    assert "ONPREM_FAILPOINTS: 'files.after_renam=exit' is not one of" in done.stderr
