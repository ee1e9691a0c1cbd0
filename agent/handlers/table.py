"""The handler table: the agent's handler of each kind in the registry (`tunnel.kinds`).

One row per kind: where its profiles sit in the config and how its handler is
made from them. `build_handlers` makes the dispatcher's handlers, keyed by
each kind's payload field; `handler_for` makes the one handler a profile
needs (`test-profile`). A new kind adds its row here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from onprem.agent.handlers.apps import AppHandler
from onprem.agent.handlers.base import Handler
from onprem.agent.handlers.database import DatabaseHandler
from onprem.agent.handlers.folders import FolderHandler
from onprem.agent.profiles import Profiles
from onprem.tunnel import kinds

__all__ = ["TABLE", "Row", "build_handlers", "handler_for", "profile_names"]


@dataclass(frozen=True)
class Row:
    """One kind's handler."""

    kind: kinds.Kind
    #: The kind's profiles in the agent's config, by name.
    profiles: Callable[[Profiles], Mapping[str, object]]
    #: Makes the handler of the kind's profiles; the flag says whether it may start background work
    #: (the folder handler's sweep of stale temp files), which a one-off check does not want.
    build: Callable[[Profiles, bool], Handler[Any]]


TABLE: tuple[Row, ...] = (
    Row(kinds.DATABASE, lambda p: p.databases, lambda p, _background: DatabaseHandler(p.databases)),
    Row(kinds.FOLDER, lambda p: p.folders, lambda p, background: FolderHandler(p.folders, sweep=background)),
    Row(kinds.APP, lambda p: p.apps, lambda p, _background: AppHandler(p.apps)),
)


def build_handlers(profiles: Profiles) -> dict[str, Handler[Any]]:
    """One handler per kind, keyed by the kind's `RequestStart.payload` field: what `Dispatcher` takes."""
    return {row.kind.payload: row.build(profiles, True) for row in TABLE}


def handler_for(profiles: Profiles, name: str) -> tuple[kinds.Kind, Handler[Any]] | None:
    """The kind of the profile called `name` and a handler of that kind's profiles, without background work;
    None when no profile has that name."""
    for row in TABLE:
        if name in row.profiles(profiles):
            return row.kind, row.build(profiles, False)
    return None


def profile_names(profiles: Profiles) -> list[str]:
    """The names of every profile, of any kind, sorted."""
    return sorted({name for row in TABLE for name in row.profiles(profiles)})
