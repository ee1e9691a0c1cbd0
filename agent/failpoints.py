"""Failpoints: named places where a test can make the agent die, exactly there.

Off unless the environment sets them when the agent starts, e.g.

    ONPREM_FAILPOINTS="database.after_commit=exit,files.after_rename=exit"

Each point is `name=action`; the one action is `exit`, which ends the process at once with status
`EXIT_STATUS` (no cleanup, no reply: as if it were killed there). The points:

- `database.before_commit`: a keyed write ran and its record is written, but nothing is committed;
- `database.after_commit`: the write and its record are committed, the reply not sent;
- `files.before_rename`: a keyed upload is written to its temporary file (or a keyed delete, move or
  new folder is about to run), and nothing took effect;
- `files.before_record`: a keyed upload's final rename took effect, its outcome not yet recorded (only
  its intent is);
- `files.after_rename`: an upload's final rename (or a delete, move or new folder) took effect and its
  ledger record is written, the reply not sent;
- `apps.before_request`: an app call is about to be sent to the app, which has seen nothing of it;
- `apps.after_response`: the app answered a call, the reply not sent.

With the variable unset, `hit` is one dictionary lookup on an empty dict.
"""

from __future__ import annotations

import logging
import os

__all__ = ["ENV", "EXIT_STATUS", "POINTS", "hit", "load"]

log = logging.getLogger("onprem.agent.failpoints")

ENV = "ONPREM_FAILPOINTS"
#: The exit status of a process stopped by a failpoint, for tests to tell it from a crash.
EXIT_STATUS = 86
POINTS = frozenset({"database.before_commit", "database.after_commit", "files.before_rename", "files.before_record",
                    "files.after_rename",
                    "apps.before_request",
                    "apps.after_response"})
_ACTIONS = frozenset({"exit"})

_armed: dict[str, str] = {}


def load(spec: str | None = None) -> dict[str, str]:
    """Arm the failpoints `spec` (default: the environment) names; ValueError for an unknown one."""
    spec = os.environ.get(ENV, "") if spec is None else spec
    armed: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, action = item.partition("=")
        if name not in POINTS or action not in _ACTIONS:
            raise ValueError(f"{ENV}: {item!r} is not one of {sorted(POINTS)} = {sorted(_ACTIONS)}")
        armed[name] = action
    _armed.clear()
    _armed.update(armed)
    if armed:
        log.warning("failpoints armed (tests only): %s", ", ".join(f"{k}={v}" for k, v in sorted(armed.items())))
    return armed


def hit(name: str) -> None:
    """Act on failpoint `name` if a test armed it; nothing otherwise."""
    if _armed and _armed.get(name) == "exit":
        # os._exit, not sys.exit: no finally blocks, no flushed replies; a kill at exactly this point.
        os._exit(EXIT_STATUS)
