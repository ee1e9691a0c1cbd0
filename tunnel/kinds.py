"""The kinds of work a tunnel carries, in one table: the only place that knows them all.

A kind (database, folder, app) is: its `ProfileKind`, its name in logs,
metrics and the store, the `RequestStart.payload` field that carries it, the
`ResponseChunk.body` field each of its operations answers with, and which of
its requests may safely run twice (so that the control plane may retry them
on another agent). The agent's dispatcher, `test-profile`, the router, the
relay and failover read it; adding a kind means a row here, its proto and its
handler.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from google.protobuf.message import Message

from onprem.v1 import profiles_pb2, tunnel_pb2

__all__ = [
    "APP", "DATABASE", "FOLDER", "KINDS", "PROFILE_CHECK", "Kind", "by_name", "by_payload", "by_profile_kind",
    "expected_body", "is_idempotent", "name_of", "profile_kind_named",
]

#: `RequestStart.payload` of a profile check, which any kind answers with `ResponseChunk.profile_check`.
PROFILE_CHECK = "profile_check"


@dataclass(frozen=True)
class Kind:
    """One kind of work."""

    profile_kind: profiles_pb2.ProfileKind
    #: "database", "folder", "app".
    name: str
    #: The `RequestStart.payload` field that carries a request of this kind.
    payload: str
    #: The oneof inside the payload that names the operation; "" when the kind has one operation.
    operation_field: str
    #: The `ResponseChunk.body` field each operation answers with.
    bodies: Mapping[str, str]
    #: Whether running `start` twice is harmless, given whether its profile is read-only.
    idempotent: Callable[[tunnel_pb2.RequestStart, bool], bool]

    def payload_of(self, start: tunnel_pb2.RequestStart) -> Message:
        """The typed message `start` carries in this kind's payload field (a `DatabaseQuery`, `FileOp`...)."""
        message: Message = getattr(start, self.payload)
        return message

    def operation(self, start: tunnel_pb2.RequestStart) -> str:
        """The operation `start` asks for ("query", "read", "call"...)."""
        if not self.operation_field:
            return next(iter(self.bodies))
        return getattr(start, self.payload).WhichOneof(self.operation_field) or ""

    def profile_of(self, start: tunnel_pb2.RequestStart) -> str:
        """The profile `start` names."""
        payload = getattr(start, self.payload)
        if not self.operation_field:
            return str(payload.head.profile)
        operation = payload.WhichOneof(self.operation_field)
        return str(getattr(payload, operation).profile) if operation else ""


_READS = frozenset({"list", "stat", "read", "poll"})
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _database_idempotent(start: tunnel_pb2.RequestStart, read_only: bool) -> bool:
    # A query can write unless the profile is read-only; batches and transactions are writes.
    return start.database_query.WhichOneof("operation") in ("query", "poll_changes") and read_only


def _folder_idempotent(start: tunnel_pb2.RequestStart, read_only: bool) -> bool:
    return start.file_op.WhichOneof("operation") in _READS


def _app_idempotent(start: tunnel_pb2.RequestStart, read_only: bool) -> bool:
    return (start.app_call.head.method or "GET").upper() in _SAFE_METHODS and not start.has_body


DATABASE = Kind(
    profiles_pb2.PROFILE_KIND_DATABASE, "database", "database_query", "operation",
    MappingProxyType({"query": "query", "batch": "batch", "transaction": "transaction",
                      "poll_changes": "poll_changes"}),
    _database_idempotent,
)
FOLDER = Kind(
    profiles_pb2.PROFILE_KIND_FOLDER, "folder", "file_op", "operation",
    MappingProxyType({"list": "list", "stat": "stat", "read": "read", "write": "write", "delete": "delete",
                      "move": "move", "make_directory": "make_directory", "poll": "poll"}),
    _folder_idempotent,
)
APP = Kind(profiles_pb2.PROFILE_KIND_APP, "app", "app_call", "", MappingProxyType({"call": "call"}), _app_idempotent)

KINDS: tuple[Kind, ...] = (DATABASE, FOLDER, APP)
_BY_PROFILE_KIND: dict[int, Kind] = {int(kind.profile_kind): kind for kind in KINDS}
_BY_PAYLOAD = {kind.payload: kind for kind in KINDS}
_BY_NAME = {kind.name: kind for kind in KINDS}


def by_profile_kind(profile_kind: int) -> Kind | None:
    return _BY_PROFILE_KIND.get(int(profile_kind))


def by_payload(payload: str | None) -> Kind | None:
    return _BY_PAYLOAD.get(payload or "")


def by_name(name: str) -> Kind | None:
    return _BY_NAME.get(name)


def name_of(profile_kind: int) -> str:
    """"database", "folder" or "app"; "?" for a kind this version does not know."""
    kind = by_profile_kind(profile_kind)
    return kind.name if kind is not None else "?"


def profile_kind_named(name: str) -> int:
    """The `ProfileKind` of "database", "folder" or "app"; PROFILE_KIND_UNSPECIFIED (0) for another name."""
    kind = by_name(name)
    return int(kind.profile_kind) if kind is not None else profiles_pb2.PROFILE_KIND_UNSPECIFIED


def expected_body(start: tunnel_pb2.RequestStart) -> str | None:
    """The `ResponseChunk.body` field the answer to `start` must use; None when `start` names no known work."""
    payload = start.WhichOneof("payload")
    if payload == PROFILE_CHECK:
        return PROFILE_CHECK
    kind = by_payload(payload)
    if kind is None:
        return None
    return kind.bodies.get(kind.operation(start))


def is_idempotent(start: tunnel_pb2.RequestStart, read_only: bool) -> bool:
    """Whether running `start` twice is harmless (`read_only`: whether its profile is a read-only database)."""
    payload = start.WhichOneof("payload")
    if payload == PROFILE_CHECK:
        return True
    kind = by_payload(payload)
    return kind is not None and kind.idempotent(start, read_only)
