"""The agent's profiles: what the site's config lets callers reach.

`parse_profiles` turns the `profiles:` section of the agent's YAML config
(the mapping under that key, not the whole file) into frozen dataclasses,
and refuses anything it does not understand with a `ConfigError` that names
the profile and field, so that a typo fails at start-up, not at first use.
Secrets are never read here: a profile names where its secret lives (an
environment variable or a file) and the handler reads it when it connects.

One module per kind: `database`, `folders`, `apps`, each a dataclass with a
`parse` classmethod; `fields` holds the typed readers they share.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from onprem.agent.profiles.apps import DEFAULT_APP_METHODS, AppProfile, BasicAuth, SecretSource
from onprem.agent.profiles.database import DatabaseProfile
from onprem.agent.profiles.fields import NAME, ConfigError, Fields
from onprem.agent.profiles.folders import FolderProfile

__all__ = [
    "DEFAULT_APP_METHODS",
    "AppProfile",
    "BasicAuth",
    "ConfigError",
    "DatabaseProfile",
    "FolderProfile",
    "Profiles",
    "SecretSource",
    "parse_profiles",
]

P = TypeVar("P")


@dataclass(frozen=True)
class Profiles:
    """Every profile of the agent, by kind and name."""

    databases: Mapping[str, DatabaseProfile] = field(default_factory=dict)
    folders: Mapping[str, FolderProfile] = field(default_factory=dict)
    apps: Mapping[str, AppProfile] = field(default_factory=dict)


def parse_profiles(raw: Mapping[str, Any] | None) -> Profiles:
    """Validate the `profiles:` section and build the profiles it describes."""
    if raw is None:
        return Profiles()
    if not isinstance(raw, Mapping):
        raise ConfigError("profiles: expected a mapping with 'databases', 'folders' and/or 'apps'")
    section = Fields.known("profiles", raw, {"databases", "folders", "apps"})
    return Profiles(
        databases=_parse_kind(section, "databases", DatabaseProfile.parse),
        folders=_parse_kind(section, "folders", FolderProfile.parse),
        apps=_parse_kind(section, "apps", AppProfile.parse),
    )


def _parse_kind(section: Fields, kind: str, parse: Callable[[str, str, Mapping[str, Any]], P]) -> dict[str, P]:
    profiles = section.get(kind)
    if profiles is None:  # `databases:` with nothing under it
        return {}
    if not isinstance(profiles, Mapping):
        raise section.error("expected a mapping of profile name to settings", kind)
    parsed: dict[str, P] = {}
    for name, body in profiles.items():
        if not isinstance(name, str) or not NAME.match(name):
            raise section.error(f"profile name {name!r} may contain only letters, digits, '-' and '_'", kind)
        where = f"profiles.{kind}.{name}"
        if not isinstance(body, Mapping):
            raise ConfigError(f"{where}: expected a mapping of settings")
        parsed[name] = parse(where, name, body)
    return parsed
