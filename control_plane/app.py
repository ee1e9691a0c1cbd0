"""The control plane's shared state and the operator request path.

`ControlPlane` owns the store, the CA, the registry of agent sessions, the
router, the token authority and the audit log; the gRPC services are thin
layers over it. `ControlPlane.relay` is the one path every operator data
request takes: authenticate, authorize the group, route to an agent, stream,
audit. Calls that are refused before or outside the relay (no or a bad token,
an admin RPC called without the role) are audited by `audit_refusal`, so that
everything refused leaves a row.
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

from onprem.control_plane import metrics
from onprem.control_plane.audit import AuditLog
from onprem.control_plane.auth import Principal
from onprem.control_plane.ca import CertificateAuthority
from onprem.control_plane.credentials import OpenCall, TokenAuthority, TokenRefused, current_call
from onprem.control_plane.failover import Opener, RoutedRequest
from onprem.control_plane.router import KIND_NAMES, GroupFacts, Registry, Router
from onprem.control_plane.store import AuditEntry, Store
from onprem.control_plane.throttle import AttemptThrottle, KeyedBuckets, RowLimiter, peer_key
from onprem.tunnel.budget import Budgets
from onprem.tunnel.errors import Code, InvalidArgument, PermissionDenied, RequestError
from onprem.tunnel.protocol import Limits
from onprem.v1 import tunnel_pb2

log = logging.getLogger("onprem.control_plane")

T = TypeVar("T")

NAME_BY_KIND = KIND_NAMES
KIND_BY_NAME = {name: kind for kind, name in KIND_NAMES.items()}

ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Settings:
    agent_cert_validity: dt.timedelta = dt.timedelta(days=30)
    limits: Limits = field(default_factory=Limits)
    #: How long a request waits for a busy group before RESOURCE_EXHAUSTED.
    queue_wait: float = 2.0
    #: What one agent's stream may make the control plane do (tunnel.budget).
    budgets: Budgets = field(default_factory=Budgets)
    #: How often open calls are checked against revocations made by other processes (the bound
    #: on how long a stream of a token revoked elsewhere runs on); this process's own
    #: revocations and expiries end calls at once.
    token_watch_interval: float = 1.0
    #: Enrollments an address may run at once; each failure keeps its share until one more comes
    #: back every `enroll_refill_seconds`; attempts past it wait for a turn, up to `enroll_max_waiting`
    #: per address (more are RESOURCE_EXHAUSTED at once).
    enroll_failure_burst: int = 5
    enroll_refill_seconds: float = 2.0
    enroll_max_waiting: int = 16
    #: Refused unauthenticated calls audited one row each per address before rows are summarised.
    refusal_rows_burst: int = 20
    refusal_rows_refill_seconds: float = 1.0
    #: Callers (addresses) remembered by each throttle; past it, new ones share one budget.
    throttle_max_addresses: int = 10_000


class GuardedRequest(RoutedRequest):
    """A routed request that ends with its call's error once the call is ended (token revoked, expired).

    Checked before and after each chunk, so chunks already queued for the operator are not
    delivered after the end; `stop` also fails the request on the agent, which stops the work
    there and wakes a reader waiting for the next chunk.
    """

    def __init__(self, start: tunnel_pb2.RequestStart, opener: Opener, call: OpenCall | None) -> None:
        super().__init__(start, opener)
        self._call = call

    def _raise_if_ended(self) -> None:
        if self._call is not None and self._call.error is not None:
            raise self._call.error

    async def __anext__(self) -> tunnel_pb2.ResponseChunk:
        self._raise_if_ended()
        chunk = await super().__anext__()
        self._raise_if_ended()
        return chunk

    def stop(self, error: RequestError) -> None:
        if self.exchange is not None and not self.exchange.ended:
            self.exchange.fail(error)


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
        self.tokens = TokenAuthority(store, self.blocking, watch_interval=self.settings.token_watch_interval)
        s = self.settings
        self.enroll_throttle = AttemptThrottle(KeyedBuckets(
            burst=s.enroll_failure_burst, refill_seconds=s.enroll_refill_seconds, max_keys=s.throttle_max_addresses),
            max_waiting=s.enroll_max_waiting)
        self._refusal_rows = RowLimiter(KeyedBuckets(
            burst=s.refusal_rows_burst, refill_seconds=s.refusal_rows_refill_seconds,
            max_keys=s.throttle_max_addresses))

    def blocking(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run a blocking store call off the event loop."""
        return asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    def close(self) -> None:
        self.tokens.close()
        self._executor.shutdown(wait=True)
        self.store.close()

    async def run_background(self) -> None:
        """The token watcher and the summaries of refusals left out of the audit, until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self.tokens.run(), name="token-watcher")
            group.create_task(self._summarise_refusals(), name="refusal-summaries")

    async def _summarise_refusals(self) -> None:
        try:
            while True:
                await asyncio.sleep(5.0)
                self._write_refusal_summaries()
        finally:
            self._write_refusal_summaries()

    def _write_refusal_summaries(self) -> None:
        for (key, (method, outcome, kind)), count in self._refusal_rows.drain().items():
            code = Code[outcome]
            self.audit.record(AuditEntry(
                at=dt.datetime.now(dt.UTC), principal=ANONYMOUS, role="", method=method, kind=kind,
                code=int(code), outcome=outcome, peer=key,
                detail=f"SUMMARY: {count} more {outcome} refusals of calls without a valid token from {key}, "
                       "not audited one by one",
            ))

    async def _group_facts(self, group: str) -> GroupFacts:
        exists = await self.blocking(self.store.get_group, group) is not None
        profiles = await self.blocking(self.store.profiles_of_group, group) if exists else set()
        return GroupFacts(
            exists=exists,
            known_profiles=frozenset((KIND_BY_NAME.get(kind, 0), name) for kind, name in profiles),
        )

    # -- operator authentication --
    async def authenticate(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        """The caller's principal: the one the API's guard authenticated this call as, if any."""
        call = current_call.get()
        if call is not None:
            if call.error is not None:
                raise call.error
            return call.principal
        metadata = cast(Sequence[tuple[str, str | bytes]], context.invocation_metadata())
        return await self.tokens.authenticate(metadata)

    # -- auditing what is refused --
    def audit_refusal(self, *, method: str, peer: str, error: RequestError, principal: Principal | None = None,
                      role: str = "", kind: str = "auth", note: str = "", began: float | None = None) -> None:
        """One audit row for a refused call: who (the token, or anonymous and the address), what, why.

        Calls refused without a valid token (no token, a bad or revoked one, enrollment attempts)
        are rows up to a budget per address; past it they are counted and summarised in one row
        per address every few seconds, so that a flood from anyone cannot grow the audit log (or
        its queue) faster than that. Refusals of a valid token are all rows: it can be revoked.
        """
        name, token_id = ANONYMOUS, None
        if principal is not None:
            name, role, token_id = principal.name, principal.role, principal.token_id
        elif isinstance(error, TokenRefused):
            name, role, token_id = error.name, error.role, error.token_id
        if principal is None and not self._refusal_rows.allow(peer_key(peer), (method, error.code.name, kind)):
            return
        self.audit.record(AuditEntry(
            at=dt.datetime.now(dt.UTC), principal=name, role=role, method=method, kind=kind,
            code=int(error.code), outcome=error.code.name,
            duration_ms=int((time.monotonic() - began) * 1000) if began is not None else 0,
            detail=f"{note}{error.reason}: {error.message}", token_id=token_id, peer=peer,
        ))

    @staticmethod
    def require_group(principal: Principal, group: str) -> None:
        if not principal.may_use_group(group):
            raise PermissionDenied(
                f"token {principal.label} may not use group '{group}' (its groups: "
                f"{', '.join(sorted(principal.groups)) or 'none'})", reason="GROUP_NOT_ALLOWED"
            )

    @staticmethod
    def require_admin(principal: Principal) -> None:
        if not principal.is_admin:
            raise PermissionDenied(f"token {principal.label} is not an admin token; ask an admin to do this",
                                   reason="ADMIN_REQUIRED")

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
        # Asked now, while the call is alive: grpc's peer() on a call that ended reads freed memory
        # (the control plane crashed with SIGSEGV when an operator cancelled a stream mid-write).
        peer = context.peer()
        kind_name = NAME_BY_KIND.get(kind, "?")
        metrics.IN_FLIGHT.labels(kind_name).inc()
        principal: Principal | None = None
        routed: GuardedRequest | None = None
        call = current_call.get()
        remove_stopper: Callable[[], None] | None = None
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
            routed = GuardedRequest(
                start, lambda excluded: self.router.open(group, kind, profile, start, excluded), call)
            await routed.open()
            if call is not None:
                # From now on an ended call fails its request instead of being cancelled.
                remove_stopper = call.add_stopper(routed.stop)
            yield routed
        except RequestError as exc:
            code, detail = exc.code, exc.reason
            raise
        except asyncio.CancelledError:
            if call is not None and call.error is not None:
                code, detail = call.error.code, call.error.reason
            else:
                code, detail = Code.CANCELLED, "caller went away"
            raise
        except BaseException:
            code = Code.INTERNAL
            raise
        finally:
            if remove_stopper is not None:
                remove_stopper()
            exchange = routed.exchange if routed is not None else None
            if exchange is not None:
                await exchange.aclose()
            metrics.IN_FLIGHT.labels(kind_name).dec()
            metrics.REQUESTS.labels(kind_name, method.rsplit("/", 1)[-1], code.name).inc()
            metrics.LATENCY.labels(kind_name).observe(time.monotonic() - began)
            if exchange is not None:
                metrics.RESPONSE_BYTES.labels(kind_name).inc(exchange.bytes_out)
            if principal is not None:
                if call is not None:
                    call.audited = True
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
                    token_id=principal.token_id,
                    peer=peer,
                ))
