"""The control plane's shared state and the operator request path.

`ControlPlane` owns the store, the CA, the registry of agent sessions, the
router and the audit log; the gRPC services are thin layers over it.
`ControlPlane.relay` is the one path every operator data request takes:
authenticate, authorize the group, route to an agent, stream, audit.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import grpc

from control_plane import metrics
from control_plane.audit import AuditLog
from control_plane.auth import Principal, parse_bearer
from control_plane.ca import CertificateAuthority
from control_plane.failover import RoutedRequest
from control_plane.router import KIND_NAMES, GroupFacts, Registry, Router
from control_plane.store import AuditEntry, Store
from onprem.v1 import tunnel_pb2
from tunnel.budget import Budgets
from tunnel.errors import Code, InvalidArgument, PermissionDenied, RequestError, Unauthenticated
from tunnel.protocol import Limits

log = logging.getLogger("onprem.control_plane")

T = TypeVar("T")

NAME_BY_KIND = KIND_NAMES
KIND_BY_NAME = {name: kind for kind, name in KIND_NAMES.items()}

#: How long an authenticated token is trusted without asking the store again.
TOKEN_CACHE_SECONDS = 10.0


@dataclass(frozen=True)
class Settings:
    agent_cert_validity: dt.timedelta = dt.timedelta(days=30)
    limits: Limits = field(default_factory=Limits)
    #: How long a request waits for a busy group before RESOURCE_EXHAUSTED.
    queue_wait: float = 2.0
    #: What one agent's stream may make the control plane do (tunnel.budget).
    budgets: Budgets = field(default_factory=Budgets)


class ControlPlane:
    def __init__(self, store: Store, ca: CertificateAuthority, settings: Settings | None = None) -> None:
        self.store = store
        self.ca = ca
        self.settings = settings or Settings()
        # Store calls block; SQLite serialises writers anyway, so a few threads suffice.
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="store")
        self.registry = Registry()
        self.router = Router(self.registry, self._group_facts, queue_wait=self.settings.queue_wait)
        self.audit = AuditLog(store.add_audits, self.blocking)
        self._tokens: dict[str, tuple[float, Principal]] = {}

    def blocking(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run a blocking store call off the event loop."""
        return asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.store.close()

    async def _group_facts(self, group: str) -> GroupFacts:
        exists = await self.blocking(self.store.get_group, group) is not None
        profiles = await self.blocking(self.store.profiles_of_group, group) if exists else set()
        return GroupFacts(
            exists=exists,
            known_profiles=frozenset((KIND_BY_NAME.get(kind, 0), name) for kind, name in profiles),
        )

    # -- operator authentication --
    async def authenticate(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        token = parse_bearer(cast(Sequence[tuple[str, str | bytes]], context.invocation_metadata()))
        if token is None:
            raise Unauthenticated(
                "missing or malformed credentials: send the metadata 'authorization: Bearer <token>'",
                reason="MISSING_TOKEN",
            )
        now = time.monotonic()
        cached = self._tokens.get(token)
        if cached is not None and now - cached[0] < TOKEN_CACHE_SECONDS:
            return cached[1]
        row = await self.blocking(self.store.authenticate_api_token, token)
        if row is None:
            self._tokens.pop(token, None)
            raise Unauthenticated("the bearer token is not valid (unknown, revoked or mistyped)", reason="BAD_TOKEN")
        principal = Principal.from_api_token(row)
        if len(self._tokens) > 10_000:
            self._tokens.clear()
        self._tokens[token] = (now, principal)
        return principal

    @staticmethod
    def require_group(principal: Principal, group: str) -> None:
        if not principal.may_use_group(group):
            raise PermissionDenied(
                f"token '{principal.name}' may not use group '{group}'", reason="GROUP_NOT_ALLOWED"
            )

    @staticmethod
    def require_admin(principal: Principal) -> None:
        if not principal.is_admin:
            raise PermissionDenied(f"token '{principal.name}' is not an admin token", reason="ADMIN_REQUIRED")

    # -- the path of every data request --
    @asynccontextmanager
    async def relay(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        *,
        method: str,
        group: str,
        kind: int,
        profile: str,
        start: tunnel_pb2.RequestStart,
    ) -> AsyncIterator[RoutedRequest]:
        began = time.monotonic()
        kind_name = NAME_BY_KIND.get(kind, "?")
        metrics.IN_FLIGHT.labels(kind_name).inc()
        principal: Principal | None = None
        routed: RoutedRequest | None = None
        code, detail = Code.OK, ""
        try:
            principal = await self.authenticate(context)
            if not group:
                raise InvalidArgument("'group' is required: the agent group to use", reason="MISSING_GROUP", field="group")
            if not profile:
                raise InvalidArgument("'profile' is required: the profile to use", reason="MISSING_PROFILE",
                                      field="profile")
            self.require_group(principal, group)
            remaining = context.time_remaining()
            if remaining is not None:
                start.timeout.FromTimedelta(dt.timedelta(seconds=max(remaining, 0.001)))
            start.attempt = 1
            routed = RoutedRequest(start, lambda excluded: self.router.open(group, kind, profile, start, excluded))
            await routed.open()
            yield routed
        except RequestError as exc:
            code, detail = exc.code, exc.reason
            raise
        except asyncio.CancelledError:
            code, detail = Code.CANCELLED, "caller went away"
            raise
        except BaseException:
            code = Code.INTERNAL
            raise
        finally:
            exchange = routed.exchange if routed is not None else None
            if exchange is not None:
                await exchange.aclose()
            metrics.IN_FLIGHT.labels(kind_name).dec()
            metrics.REQUESTS.labels(kind_name, method.rsplit("/", 1)[-1], code.name).inc()
            metrics.LATENCY.labels(kind_name).observe(time.monotonic() - began)
            if exchange is not None:
                metrics.RESPONSE_BYTES.labels(kind_name).inc(exchange.bytes_out)
            if principal is not None:
                self.audit.record(AuditEntry(
                    at=dt.datetime.now(dt.UTC),
                    principal=principal.name,
                    role=principal.role,
                    method=method,
                    kind=NAME_BY_KIND.get(kind, "?"),
                    code=int(code),
                    outcome=code.name,
                    group_name=group,
                    agent_id=exchange.session.agent_id if exchange is not None else None,
                    profile=profile,
                    bytes_out=exchange.bytes_out if exchange is not None else 0,
                    duration_ms=int((time.monotonic() - began) * 1000),
                    detail=detail,
                ))
