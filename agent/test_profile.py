"""`onprem-agent test-profile NAME`: run a profile's checks locally and print them.

The same checks the control plane asks for with `AgentService/CheckProfile`,
run without a control plane, so that a site can verify a new profile (host
reachable, credentials accepted, database exists, dialect matches the server,
the user may read) before enrolling or restarting the agent.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from agent.config import load_config
from agent.handlers.base import Handler
from agent.profiles import ConfigError
from tunnel.errors import RequestError

__all__ = ["run_test_profile"]


def _handler_for(config_path: Path, name: str) -> tuple[str, Handler]:
    from agent.handlers.apps import AppHandler
    from agent.handlers.database import DatabaseHandler
    from agent.handlers.files import FolderHandler

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
    """Print `✓ check: message` / `✗ check: message` per check; 0 when all pass, else 1."""
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
        print(f"{'✓' if check.ok else '✗'} {check.name}: {check.message}", file=out)
    return 0 if checks and all(c.ok for c in checks) else 1
