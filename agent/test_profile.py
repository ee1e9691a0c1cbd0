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
from typing import TextIO

from onprem.agent.config import load_config
from onprem.agent.handlers.base import Handler
from onprem.agent.profiles import ConfigError
from onprem.tunnel.errors import RequestError
from onprem.v1 import profiles_pb2

__all__ = ["mark", "run_test_profile"]


def mark(check: profiles_pb2.ProfileCheck) -> str:
    """✓ passed, ! passed with a warning (something to fix that does not stop the profile), ✗ failed."""
    if not check.ok:
        return "✗"
    return "!" if check.warning else "✓"


def _handler_for(config_path: Path, name: str) -> tuple[str, Handler]:
    from onprem.agent.handlers.apps import AppHandler
    from onprem.agent.handlers.database import DatabaseHandler
    from onprem.agent.handlers.folders import FolderHandler

    profiles = load_config(config_path).profiles
    if name in profiles.databases:
        return "database", DatabaseHandler(profiles.databases)
    if name in profiles.folders:
        return "folder", FolderHandler(profiles.folders, sweep=False)
    if name in profiles.apps:
        return "app", AppHandler(profiles.apps)
    known = sorted({*profiles.databases, *profiles.folders, *profiles.apps})
    raise ConfigError(f"no profile named {name!r} in {config_path}; configured: {', '.join(known) or 'none'}")


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
