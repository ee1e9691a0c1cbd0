"""`onprem-agent test-profile NAME`: run a profile's checks locally and print them.

The same checks the control plane asks for with `AgentService/CheckProfile`,
run without a control plane, so that a site can verify a new profile (host
reachable, credentials accepted, database exists, dialect matches the server,
the user may read; for a read-only profile, that the database enforces it and
whether its role could write anyway) before enrolling or restarting the agent.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

from onprem.agent.config import load_config
from onprem.agent.handlers.base import Handler
from onprem.agent.handlers.table import handler_for, profile_names
from onprem.agent.profiles import ConfigError
from onprem.tunnel.errors import RequestError
from onprem.v1 import profiles_pb2

__all__ = ["mark", "run_test_profile"]


def mark(check: profiles_pb2.ProfileCheck) -> str:
    """✓ passed, ! passed with a warning (something to fix that does not stop the profile), ✗ failed."""
    if not check.ok:
        return "✗"
    return "!" if check.warning else "✓"


def _handler_for(config_path: Path, name: str) -> tuple[str, Handler[Any]]:
    """The kind's name ("database"...) and a handler for the profile called `name`."""
    profiles = load_config(config_path).profiles
    found = handler_for(profiles, name)
    if found is None:
        known = profile_names(profiles)
        raise ConfigError(f"no profile named {name!r} in {config_path}; configured: {', '.join(known) or 'none'}")
    kind, handler = found
    return kind.name, handler


async def run_test_profile(config_path: Path, name: str, out: TextIO | None = None) -> int:
    """Print `✓ check: message` (or `!` for a warning, `✗` for a failure) per check; 0 when none failed, else 1."""
    out = out or sys.stdout
    try:
        kind, handler = _handler_for(config_path, name)
    except ConfigError as exc:
        print(f"✗ config: {exc}", file=out)
        return 1
    try:
        checks = await handler.check(name)
    except RequestError as exc:
        print(f"✗ {kind} profile {name}: {exc.message}", file=out)
        return 1
    finally:
        await handler.aclose()
    for check in checks:
        print(f"{mark(check)} {check.name}: {check.message}", file=out)
    return 0 if checks and all(c.ok for c in checks) else 1
