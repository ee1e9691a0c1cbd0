"""`onprem.v1.AuditService`: the audit log, read through the API (`ListAuditEvents`).

What a token sees does not depend on what it asks for: its scope (`scope_of`) is applied to every query in
the store, and a filter can only narrow it. A filter that names something outside the scope (a group the
token may not use; admin or enrollment events for an operator token) is PERMISSION_DENIED rather than an
empty page, so that a person sees why. The scope, as audit.proto documents it:

- an admin token for every group ("*"): every row, those of no group included (token management, calls
  refused without a valid token);
- another admin token: the rows of its groups;
- an operator token: the rows of its groups (of every group for "*"), except those of kind "admin" and
  "enroll": what admins did is for admins.

Page tokens carry the (time, id) of the page's last row and a digest of the filters and of the caller's
token id, signed with HMAC-SHA256 under a key that the replicas share through the store (claimed by the
first one to need it), so that a page token from one replica works on another. A token that does not verify,
or was made for other filters or another caller, is INVALID_ARGUMENT naming `page_token`. The signature keeps
tokens opaque and stable; it is not what protects the rows, which is the scope.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
import hashlib
import hmac
import json
import re
import secrets
from typing import Any

import grpc
from google.protobuf.message import Message

from onprem.control_plane.api import errors
from onprem.control_plane.auth import Principal
from onprem.control_plane.core import ControlPlane
from onprem.control_plane.store import (
    ALL_GROUPS,
    API_TOKEN_PREFIX,
    AuditCursor,
    AuditEntry,
    AuditFilter,
    AuditScope,
    parse_token_id,
    validate_group_name,
)
from onprem.tunnel.errors import Code, InvalidArgument, PermissionDenied
from onprem.v1 import audit_pb2, audit_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
#: Every kind of row the audit log holds (`observe.Observation.kind`).
KINDS = ("database", "folder", "app", "admin", "request", "enroll", "auth")
#: Kinds an operator token does not see: what admins did, and agents enrolling.
ADMIN_KINDS = frozenset({"admin", "enroll"})
#: The store setting holding the key that signs page tokens (shared by the replicas).
PAGE_KEY_SETTING = "audit_page_token_key"
_AGENT_ID_MAX = 128
_PROFILE_MAX = 200
_TOKEN_VERSION = 1
_TRACE_ID = re.compile(r"[0-9a-f]{32}")


def scope_of(principal: Principal) -> AuditScope:
    """What `principal` may see of the audit log, whatever it asks for."""
    every_group = ALL_GROUPS in principal.groups
    groups = None if every_group else frozenset(principal.groups)
    if principal.is_admin:
        return AuditScope(groups=groups, groupless=every_group)
    return AuditScope(groups=groups, groupless=False, hidden_kinds=ADMIN_KINDS)


# --- the request ------------------------------------------------------------------------------------------------


def _time(request: Message, name: str) -> dt.datetime | None:
    if not request.HasField(name):
        return None
    try:
        value: dt.datetime = getattr(request, name).ToDatetime(tzinfo=dt.UTC)
    except (ValueError, OverflowError, OSError):
        raise InvalidArgument(f"'{name}' is not a valid time", reason="INVALID_TIME", field=name) from None
    return value


def _text(value: str, name: str, limit: int) -> str | None:
    if len(value) > limit:
        raise InvalidArgument(f"'{name}' must be at most {limit} characters", reason="INVALID_FILTER", field=name)
    return value or None


def parse_filter(request: audit_pb2.ListAuditEventsRequest, principal: Principal) -> AuditFilter:
    """The request's filters, checked; refuses those outside the caller's scope (PERMISSION_DENIED)."""
    start, end = _time(request, "start_time"), _time(request, "end_time")
    if start is not None and end is not None and start > end:
        raise InvalidArgument("'end_time' must not be before 'start_time'", reason="INVALID_TIME_RANGE",
                              field="end_time")
    token_id = None
    if request.token_id:
        token_id = parse_token_id(request.token_id, API_TOKEN_PREFIX)
        if token_id is None:
            raise InvalidArgument("'token_id' must name an operator token: its id (16 hex digits), \"onp_<id>\" or "
                                  "\"tokens/<id>\", as ListTokens shows it", reason="INVALID_TOKEN_ID",
                                  field="token_id")
    group = request.group or None
    if group is not None:
        try:
            validate_group_name(group)
        except ValueError as exc:
            raise InvalidArgument(f"'group': {exc}", reason="INVALID_GROUP", field="group") from None
        ControlPlane.require_group(principal, group)
    kind = request.kind or None
    if kind is not None:
        if kind not in KINDS:
            raise InvalidArgument(f"'kind' must be one of {', '.join(KINDS)}", reason="INVALID_KIND", field="kind")
        if kind in ADMIN_KINDS and not principal.is_admin:
            raise PermissionDenied(f"token {principal.label} is an operator token: events of kind '{kind}' are "
                                   "for admins", reason="ADMIN_REQUIRED")
    outcome = request.outcome or None
    if outcome is not None and outcome not in Code.__members__:
        raise InvalidArgument("'outcome' must be a gRPC status name, e.g. OK, NOT_FOUND or PERMISSION_DENIED",
                              reason="INVALID_OUTCOME", field="outcome")
    trace_id = request.trace_id or None
    if trace_id is not None and not _TRACE_ID.fullmatch(trace_id):
        raise InvalidArgument("'trace_id' must be a W3C trace id: 32 lower-case hex digits, as AuditEvent.trace_id "
                              "shows it", reason="INVALID_TRACE_ID", field="trace_id")
    return AuditFilter(start=start, end=end, token_id=token_id, group=group,
                       agent_id=_text(request.agent_id, "agent_id", _AGENT_ID_MAX),
                       profile=_text(request.profile, "profile", _PROFILE_MAX), kind=kind, outcome=outcome,
                       trace_id=trace_id)


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument("'page_size' must not be negative", reason="INVALID_PAGE_SIZE", field="page_size")
    # Larger than the maximum is served as the maximum, not refused (AIP-158).
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


# --- page tokens ------------------------------------------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def query_digest(wanted: AuditFilter, principal: Principal) -> str:
    """What a page token is bound to: the filters and the caller's token."""
    fields = [principal.token_id, *(None if v is None else v.isoformat() if isinstance(v, dt.datetime) else v
                                    for v in (wanted.start, wanted.end, wanted.token_id, wanted.group, wanted.agent_id,
                                              wanted.profile, wanted.kind, wanted.outcome))]
    if wanted.trace_id is not None:
        # Only when given: the page tokens of the filters that came before stay valid across an upgrade.
        fields.append(wanted.trace_id)
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:32]


class PageTokens:
    """Signed, opaque page tokens: "<payload>.<mac>", both base64url."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()[:16]

    def encode(self, cursor: AuditCursor, digest: str) -> str:
        at, row_id = cursor
        micros = (at - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)
        payload = json.dumps([_TOKEN_VERSION, micros, row_id, digest], separators=(",", ":")).encode()
        return f"{_b64(payload)}.{_b64(self._mac(payload))}"

    def decode(self, text: str, digest: str) -> AuditCursor | None:
        if not text:
            return None
        try:
            payload_text, mac_text = text.split(".")
            payload = _unb64(payload_text)
            if not hmac.compare_digest(self._mac(payload), _unb64(mac_text)):
                raise ValueError("bad signature")
            version, micros, row_id, made_for = json.loads(payload)
            if version != _TOKEN_VERSION or not isinstance(micros, int) or not isinstance(row_id, int):
                raise ValueError("bad payload")
        except (ValueError, TypeError, binascii.Error):
            raise InvalidArgument("'page_token' is not one this API returned; pass the previous response's "
                                  "'next_page_token', or nothing for the first page", reason="INVALID_PAGE_TOKEN",
                                  field="page_token") from None
        if made_for != digest:
            raise InvalidArgument("'page_token' was made for other filters or another token: repeat the first "
                                  "page's filters, or start again without it", reason="INVALID_PAGE_TOKEN",
                                  field="page_token")
        return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=micros), row_id


# --- the service ------------------------------------------------------------------------------------------------


def event_message(row: AuditEntry) -> audit_pb2.AuditEvent:
    event = audit_pb2.AuditEvent(
        id=row.id or 0, principal=row.principal, token_id=row.token_id or "", role=row.role, method=row.method,
        group=row.group_name or "", agent_id=row.agent_id or "", profile=row.profile or "", kind=row.kind,
        outcome=row.outcome, code=row.code, bytes_out=row.bytes_out, duration_ms=row.duration_ms, detail=row.detail,
        peer=row.peer or "", trace_id=row.trace_id or "")
    event.time.FromDatetime(row.at)
    return event


class AuditService(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self._cp = cp
        self._tokens: PageTokens | None = None

    async def _page_tokens(self) -> PageTokens:
        if self._tokens is None:
            key = await self._cp.blocking(self._cp.store.claim_setting, PAGE_KEY_SETTING, secrets.token_hex(32))
            self._tokens = PageTokens(bytes.fromhex(key))
        return self._tokens

    @errors.unary
    async def ListAuditEvents(
        self, request: audit_pb2.ListAuditEventsRequest, context: Context
    ) -> audit_pb2.ListAuditEventsResponse:
        principal = await self._cp.authenticate(context)
        wanted = parse_filter(request, principal)
        size = page_size(request.page_size)
        tokens = await self._page_tokens()
        digest = query_digest(wanted, principal)
        after = tokens.decode(request.page_token, digest)
        rows = await self._cp.blocking(functools.partial(
            self._cp.store.list_audit_events, wanted, scope_of(principal), limit=size + 1, after=after))
        response = audit_pb2.ListAuditEventsResponse(events=[event_message(r) for r in rows[:size]])
        if len(rows) > size:
            last = rows[size - 1]
            assert last.id is not None
            response.next_page_token = tokens.encode((last.at, last.id), digest)
        return response
