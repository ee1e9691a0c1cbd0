"""Folder profiles: `profiles.folders.<name>` of the agent's config."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from onprem.agent.profiles.fields import Fields

__all__ = ["FolderProfile"]

_FIELDS = {"root", "read_only", "max_file_size", "read_patterns", "write_patterns"}


@dataclass(frozen=True)
class FolderProfile:
    """A folder tree; `root` is absolute and already resolved (no symlinks)."""

    name: str
    root: str
    read_only: bool = False
    #: The largest file a write may create, in bytes; None: no limit but the disk.
    max_file_size: int | None = None
    #: Globs (fnmatch, case-sensitive) on the names of files that Read may stream and Poll
    #: reports; empty: any name. List and Stat still show every name: they show no content.
    read_patterns: tuple[str, ...] = ()
    #: Globs on the names of files that may be written, deleted or renamed (both names); empty:
    #: any name. With patterns set, folders are deleted only when empty.
    write_patterns: tuple[str, ...] = ()

    @classmethod
    def parse(cls, where: str, name: str, body: Mapping[str, Any]) -> FolderProfile:
        """The profile `body` describes, or a `ConfigError` naming the field at fault."""
        fields = Fields.known(where, body, _FIELDS)
        root = fields.required_str("root")
        if not os.path.isabs(root):
            raise fields.error(f"must be an absolute path, got {root!r}", "root")
        if not os.path.isdir(root):
            raise fields.error(f"{root!r} is not an existing directory", "root")
        max_file_size = fields.optional_positive_int("max_file_size")
        # Resolve once so that confinement compares real paths with a real root.
        return cls(
            name=name,
            root=os.path.realpath(root),
            read_only=fields.flag("read_only"),
            max_file_size=max_file_size,
            read_patterns=_name_patterns(fields, "read_patterns"),
            write_patterns=_name_patterns(fields, "write_patterns"),
        )


def _name_patterns(fields: Fields, key: str) -> tuple[str, ...]:
    value = fields.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        raise fields.error("expected a non-empty list of name globs, e.g. ['*.csv']", key)
    for pattern in value:
        if not isinstance(pattern, str) or not pattern:
            raise fields.error(f"expected non-empty strings, got {pattern!r}", key)
        # Patterns match a file's name, never its folders: a "/" could only ever fail to match.
        if "/" in pattern:
            raise fields.error(f"{pattern!r} contains '/'; patterns match file names only", key)
    return tuple(value)
