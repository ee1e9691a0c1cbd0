"""`onprem.v1.TokenService`: create, list and revoke operator tokens; list and revoke enrollment tokens.

Admin only. An admin token limited to some groups sees and manages only the
tokens whose groups it may use itself, and can grant only those groups: a
leaked admin token of one site cannot mint or revoke tokens of another (an
admin for every group can always do all of it). Tokens outside a caller's
reach are NOT_FOUND, as if they did not exist.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import functools
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc

from onprem.control_plane import observe
from onprem.control_plane import store as store_mod
from onprem.control_plane.api import errors
from onprem.control_plane.api.agents import duration
from onprem.control_plane.auth import Principal
from onprem.control_plane.changes import TOKENS
from onprem.control_plane.core import ControlPlane
from onprem.control_plane.credentials import current_call
from onprem.control_plane.store import (
    ALL_GROUPS,
    API_TOKEN_PREFIX,
    ENROLLMENT_TOKEN_PREFIX,
    OPERATOR_TOKEN_TTL_MAX,
    REASON_MAX,
    TOKEN_NAME_MAX,
    ApiTokenRow,
    EnrollmentTokenRow,
    PageKey,
    Role,
    iso_utc,
    parse_token_id,
)
from onprem.tunnel.errors import InvalidArgument, NotFound, PermissionDenied
from onprem.v1 import tokens_pb2, tokens_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]
Row = TypeVar("Row", ApiTokenRow, EnrollmentTokenRow)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

_ROLES: dict[tokens_pb2.TokenRole, Role] = {
    tokens_pb2.TOKEN_ROLE_OPERATOR: "operator", tokens_pb2.TOKEN_ROLE_ADMIN: "admin"}
_ROLE_ENUMS: dict[str, tokens_pb2.TokenRole] = {name: number for number, name in _ROLES.items()}
_STATES = {"active": tokens_pb2.TOKEN_STATE_ACTIVE, "expired": tokens_pb2.TOKEN_STATE_EXPIRED,
           "revoked": tokens_pb2.TOKEN_STATE_REVOKED}
_ENROLLMENT_STATES = {
    "active": tokens_pb2.ENROLLMENT_TOKEN_STATE_ACTIVE, "used": tokens_pb2.ENROLLMENT_TOKEN_STATE_USED,
    "expired": tokens_pb2.ENROLLMENT_TOKEN_STATE_EXPIRED, "revoked": tokens_pb2.ENROLLMENT_TOKEN_STATE_REVOKED,
}


def token_message(row: ApiTokenRow, now: dt.datetime) -> tokens_pb2.Token:
    token = tokens_pb2.Token(
        name=f"tokens/{row.token_id}", id=row.token_id, display_name=row.name, role=_ROLE_ENUMS[row.role],
        groups=row.groups, state=_STATES[row.state(now)], created_by=row.created_by, revoked_by=row.revoked_by,
        revoke_reason=row.revoke_reason,
    )
    token.created_at.FromDatetime(row.created_at)
    for name, value in (("expires_at", row.expires_at), ("last_used_at", row.last_used_at),
                        ("revoked_at", row.revoked_at)):
        if value is not None:
            getattr(token, name).FromDatetime(value)
    return token


def enrollment_message(row: EnrollmentTokenRow, now: dt.datetime) -> tokens_pb2.EnrollmentToken:
    token = tokens_pb2.EnrollmentToken(
        name=f"enrollmentTokens/{row.token_id}", id=row.token_id, group=row.group_name,
        description=row.description, state=_ENROLLMENT_STATES[row.state(now)], created_by=row.created_by,
        used_by_agent=row.used_by_agent or "", revoked_by=row.revoked_by, revoke_reason=row.revoke_reason,
    )
    token.created_at.FromDatetime(row.created_at)
    token.expires_at.FromDatetime(row.expires_at)
    for name, value in (("used_at", row.used_at), ("revoked_at", row.revoked_at)):
        if value is not None:
            getattr(token, name).FromDatetime(value)
    return token


# --- paging -----------------------------------------------------------------------------------------------------


def _page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument("'page_size' must not be negative", reason="INVALID_PAGE_SIZE", field="page_size")
    # Larger than the maximum is served as the maximum, not refused (AIP-158).
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _encode_page_token(key: PageKey) -> str:
    created_at, token_id = key
    raw = json.dumps([created_at.isoformat(), token_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_page_token(text: str) -> PageKey | None:
    if not text:
        return None
    try:
        created, token_id = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        key = (dt.datetime.fromisoformat(created), str(token_id))
        if key[0].tzinfo is None:
            raise ValueError("naive time")
        return key
    except (ValueError, TypeError, binascii.Error, json.JSONDecodeError):
        raise InvalidArgument("'page_token' is not one this API returned; pass the previous response's "
                              "'next_page_token', or nothing for the first page", reason="INVALID_PAGE_TOKEN",
                              field="page_token") from None


def _key(row: ApiTokenRow | EnrollmentTokenRow) -> PageKey:
    return row.created_at, row.token_id


def _page(fetch: Callable[[int, PageKey | None], Sequence[Row]], visible: Callable[[Row], bool],
          size: int, after: PageKey | None) -> tuple[list[Row], PageKey | None]:
    """Up to `size` visible rows after `after`, and the key to continue from (None at the end).

    Rows the caller may not see are skipped without counting, so a page is full whenever
    there is more to show.
    """
    shown: list[Row] = []
    while True:
        batch = fetch(size + 1, after)
        for row in batch:
            if not visible(row):
                after = _key(row)
                continue
            if len(shown) == size:
                return shown, _key(shown[-1])
            shown.append(row)
            after = _key(row)
        if len(batch) <= size:
            return shown, None


# --- the service ----------------------------------------------------------------------------------------------


class TokenService(tokens_pb2_grpc.TokenServiceServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self._cp = cp

    async def _admin(self, context: Context) -> Principal:
        principal = await self._cp.authenticate(context)
        self._cp.require_admin(principal)
        return principal

    @staticmethod
    def _reason(text: str) -> str:
        if len(text) > REASON_MAX:
            raise InvalidArgument(f"'reason' must be at most {REASON_MAX} characters", reason="INVALID_REASON",
                                  field="reason")
        return text

    # -- operator tokens --
    @errors.unary
    async def CreateToken(self, request: tokens_pb2.CreateTokenRequest, context: Context) -> tokens_pb2.CreateTokenResponse:
        principal = await self._admin(context)
        spec = request.token
        name = spec.display_name.strip()
        if not name or len(name) > TOKEN_NAME_MAX:
            raise InvalidArgument(f"'token.display_name' is required: a name for people, e.g. \"ci-bot\" (at most "
                                  f"{TOKEN_NAME_MAX} characters)", reason="INVALID_NAME", field="token.display_name")
        role = _ROLES.get(spec.role)
        if role is None:
            raise InvalidArgument("'token.role' is required: TOKEN_ROLE_OPERATOR or TOKEN_ROLE_ADMIN",
                                  reason="INVALID_ROLE", field="token.role")
        groups = list(dict.fromkeys(spec.groups))
        if not groups:
            raise InvalidArgument("'token.groups' is required: the groups the token may use, or \"*\" for every "
                                  "group", reason="MISSING_GROUPS", field="token.groups")
        for group in groups:
            if group != ALL_GROUPS:
                try:
                    store_mod.validate_group_name(group)
                except ValueError as exc:
                    raise InvalidArgument(f"'token.groups': {exc}", reason="INVALID_GROUP",
                                          field="token.groups") from None
        if not principal.may_grant(groups):
            raise PermissionDenied(f"token {principal.label} may not grant groups it cannot use itself "
                                   f"({', '.join(sorted(principal.groups)) or 'none'})", reason="GROUP_NOT_ALLOWED")
        ttl: dt.timedelta | None = None
        if request.HasField("ttl"):
            ttl = duration(request, "ttl", OPERATOR_TOKEN_TTL_MAX, maximum=OPERATOR_TOKEN_TTL_MAX,
                           reason="INVALID_TTL")
            if ttl <= dt.timedelta(0):
                raise InvalidArgument(f"'ttl' must be more than 0 and at most {OPERATOR_TOKEN_TTL_MAX.days} days",
                                      reason="INVALID_TTL", field="ttl")
        secret, row = await self._cp.blocking(functools.partial(
            self._cp.store.create_api_token, name, role, groups, ttl, created_by=principal.label))
        expires = iso_utc(row.expires_at) if row.expires_at is not None else "never"
        observe.record(f"created {row.role} token {row.label} for groups {','.join(row.groups)}, expires {expires}")
        now = dt.datetime.now(dt.UTC)
        return tokens_pb2.CreateTokenResponse(token=token_message(row, now), secret=secret)

    @errors.unary
    async def ListTokens(self, request: tokens_pb2.ListTokensRequest, context: Context) -> tokens_pb2.ListTokensResponse:
        principal = await self._admin(context)
        size, after = _page_size(request.page_size), _decode_page_token(request.page_token)
        store = self._cp.store

        def fetch(limit: int, key: PageKey | None) -> list[ApiTokenRow]:
            return store.list_api_tokens(limit=limit, after=key)

        rows, more = await self._cp.blocking(_page, fetch, lambda r: principal.may_grant(r.groups), size, after)
        now = dt.datetime.now(dt.UTC)
        # Last-used times are written in batches; this process's own latest uses are fresher.
        rows = [dataclasses.replace(r, last_used_at=self._cp.tokens.last_used(r)) for r in rows]
        return tokens_pb2.ListTokensResponse(tokens=[token_message(r, now) for r in rows],
                                             next_page_token=_encode_page_token(more) if more else "")

    @errors.unary
    async def RevokeToken(self, request: tokens_pb2.RevokeTokenRequest, context: Context) -> tokens_pb2.RevokeTokenResponse:
        principal = await self._admin(context)
        token_id = parse_token_id(request.name, API_TOKEN_PREFIX)
        if token_id is None:
            raise InvalidArgument("'name' must name an operator token: \"tokens/<id>\", where ListTokens shows the "
                                  "ids (16 hex digits)", reason="INVALID_NAME", field="name")
        reason = self._reason(request.reason)
        row = await self._cp.blocking(self._cp.store.get_api_token, token_id)
        if row is None or not principal.may_grant(row.groups):
            raise NotFound(f"no operator token has the id '{token_id}'; ListTokens shows the tokens you may manage",
                           reason="TOKEN_NOT_FOUND")
        already = row.revoked
        row = await self._cp.blocking(functools.partial(
            self._cp.store.revoke_api_token, token_id, by=principal.label, reason=reason))
        ended = self._cp.tokens.revoked(row, sparing=current_call.get())
        await self._cp.changes.publish(TOKENS, token_id=row.token_id)  # the other replicas end theirs now
        what = "was already revoked" if already else f"revoked; {ended} open calls ended"
        observe.record(f"token {row.label} {what}" + (f": {reason}" if reason else ""))
        return tokens_pb2.RevokeTokenResponse(token=token_message(row, dt.datetime.now(dt.UTC)))

    # -- enrollment tokens --
    @errors.unary
    async def ListEnrollmentTokens(
        self, request: tokens_pb2.ListEnrollmentTokensRequest, context: Context
    ) -> tokens_pb2.ListEnrollmentTokensResponse:
        principal = await self._admin(context)
        group = request.group or None
        if group is not None:
            self._cp.require_group(principal, group)
        size, after = _page_size(request.page_size), _decode_page_token(request.page_token)
        store = self._cp.store

        def fetch(limit: int, key: PageKey | None) -> list[EnrollmentTokenRow]:
            return store.list_enrollment_tokens(limit=limit, after=key, group=group)

        rows, more = await self._cp.blocking(_page, fetch, lambda r: principal.may_use_group(r.group_name), size, after)
        now = dt.datetime.now(dt.UTC)
        return tokens_pb2.ListEnrollmentTokensResponse(
            enrollment_tokens=[enrollment_message(r, now) for r in rows],
            next_page_token=_encode_page_token(more) if more else "")

    @errors.unary
    async def RevokeEnrollmentToken(
        self, request: tokens_pb2.RevokeEnrollmentTokenRequest, context: Context
    ) -> tokens_pb2.RevokeEnrollmentTokenResponse:
        principal = await self._admin(context)
        token_id = parse_token_id(request.name, ENROLLMENT_TOKEN_PREFIX)
        if token_id is None:
            raise InvalidArgument("'name' must name an enrollment token: \"enrollmentTokens/<id>\", where "
                                  "ListEnrollmentTokens shows the ids (16 hex digits)", reason="INVALID_NAME",
                                  field="name")
        reason = self._reason(request.reason)
        row = await self._cp.blocking(self._cp.store.get_enrollment_token, token_id)
        if row is None or not principal.may_use_group(row.group_name):
            raise NotFound(f"no enrollment token has the id '{token_id}'; ListEnrollmentTokens shows the tokens you "
                           "may manage", reason="TOKEN_NOT_FOUND")
        # A used token raises UsedEnrollmentTokenNotRevocable (FAILED_PRECONDITION, TOKEN_USED).
        row = await self._cp.blocking(functools.partial(
            self._cp.store.revoke_enrollment_token, token_id, by=principal.label, reason=reason))
        observe.record(f"enrollment token {row.short_id} revoked" + (f": {reason}" if reason else ""),
                       group=row.group_name)
        return tokens_pb2.RevokeEnrollmentTokenResponse(
            enrollment_token=enrollment_message(row, dt.datetime.now(dt.UTC)))
