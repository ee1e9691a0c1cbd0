"""The core every control-plane service shares: its state, and the entrance of the operator data path.

`ControlPlane` owns the store, the CA, the registry of agent sessions, the
router, the token authority, the audit log and the observer that feeds it; the
gRPC services are thin layers over it. `ControlPlane.relay` is the one path
every operator data request takes: authorize the group, then hand the request
to a `relay.RelayedRequest`, which routes, retries and streams it, while the
call's `observe.Observation` records what happened for the audit and metrics.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import grpc
from opentelemetry.trace import SpanKind

from onprem.control_plane import __version__, observe
from onprem.control_plane.api.whole_results import DEFAULT_BUDGET_BYTES
from onprem.control_plane.audit import AuditLog
from onprem.control_plane.auth import Principal
from onprem.control_plane.ca import CertificateAuthority
from onprem.control_plane.changes import TOKENS, ChangeFeed
from onprem.control_plane.credentials import NotifiedCounter, StoreCounter, TokenAuthority, current_call
from onprem.control_plane.observe import Observer
from onprem.control_plane.relay import RelayedRequest, Target
from onprem.control_plane.replicas import REPLICAS_TOPIC, Membership, ReplicaIdentity
from onprem.control_plane.router import GroupFacts, Registry, Router
from onprem.control_plane.sessions import AgentSession
from onprem.control_plane.store import DrainRow, Store
from onprem.control_plane.throttle import AttemptThrottle, KeyedBuckets, RowLimiter
from onprem.tunnel import kinds, tracing
from onprem.tunnel.budget import Budgets
from onprem.tunnel.errors import InvalidArgument, PermissionDenied, RequestError
from onprem.tunnel.protocol import Limits
from onprem.v1 import tunnel_pb2

log = logging.getLogger("onprem.control_plane")

T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    agent_cert_validity: dt.timedelta = dt.timedelta(days=30)
    limits: Limits = field(default_factory=Limits)
    #: How long a request waits for a busy group before RESOURCE_EXHAUSTED.
    queue_wait: float = 2.0
    #: Bytes that ExecuteQuery calls may hold at once in whole results (api.whole_results).
    whole_results_budget_bytes: int = DEFAULT_BUDGET_BYTES
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
    #: Seconds between a replica's heartbeats in the registry; one that missed this many is gone.
    replica_heartbeat: float = 2.0
    replica_missed_heartbeats: int = 3
    #: Seconds after a replica starts during which a request for a group whose agents are on other
    #: replicas waits for them to reach this one, rather than failing UNAVAILABLE.
    replica_warmup: float = 10.0
    #: Seconds between checks of this replica's agents against the store (revocations and drains
    #: another replica made, should their notification be missed).
    change_check_interval: float = 2.0


class ControlPlane:
    def __init__(self, store: Store, ca: CertificateAuthority, settings: Settings | None = None,
                 identity: ReplicaIdentity | None = None) -> None:
        self.store = store
        self.ca = ca
        self.settings = settings or Settings()
        # Store calls block; SQLite serialises writers anyway, so a few threads suffice.
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="store")
        self.registry = Registry()
        self.router = Router(self.registry, self._group_facts, queue_wait=self.settings.queue_wait,
                             elsewhere=self._held_elsewhere)
        self.audit = AuditLog(store.add_audits, self.blocking)
        self.changes = ChangeFeed(self, check_interval=self.settings.change_check_interval)
        counter: NotifiedCounter | None = None
        if store.notifies:
            counter = NotifiedCounter(StoreCounter(store, self.blocking), self.changes.listening_epoch)
        self.tokens = TokenAuthority(store, self.blocking, counter=counter,
                                     watch_interval=self.settings.token_watch_interval)
        s = self.settings
        self.enroll_throttle = AttemptThrottle(KeyedBuckets(
            burst=s.enroll_failure_burst, refill_seconds=s.enroll_refill_seconds, max_keys=s.throttle_max_addresses),
            max_waiting=s.enroll_max_waiting)
        self.observer = Observer(self.audit, RowLimiter(KeyedBuckets(
            burst=s.refusal_rows_burst, refill_seconds=s.refusal_rows_refill_seconds,
            max_keys=s.throttle_max_addresses)))
        self.membership = Membership(
            self, identity or ReplicaIdentity("cp-" + secrets.token_hex(6)), heartbeat=s.replica_heartbeat,
            missed_heartbeats=s.replica_missed_heartbeats, version=__version__)
        self.membership.on_change = self._tell_agents
        self.changes.on(REPLICAS_TOPIC, lambda _message: self.membership.wake())
        def tokens_changed(_message: Mapping[str, Any]) -> None:
            if counter is not None:
                counter.invalidate()
            self.tokens.poke()

        self.changes.on(TOKENS, tokens_changed)
        self.changes.set_check(self.check_agents)
        #: Drains carried out here, by (agent id, when it was asked), so that none is carried out twice.
        self._drains_done: set[tuple[str, dt.datetime]] = set()

    @property
    def replica_id(self) -> str:
        return self.membership.identity.replica_id

    def blocking(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run a blocking store call off the event loop."""
        return asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    def close(self) -> None:
        self.tokens.close()
        self._executor.shutdown(wait=True)
        self.store.close()

    async def run_background(self) -> None:
        """The token watcher, the refusal summaries, the replica's heartbeat and the change feed, until
        cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self.tokens.run(), name="token-watcher")
            group.create_task(self.observer.run_summaries(), name="refusal-summaries")
            group.create_task(self.membership.run(), name="replica-heartbeat")
            group.create_task(self.changes.run(), name="change-feed")

    # -- replicas --
    def start_warmup(self) -> None:
        """This replica starts serving: for a while, requests wait for agents held by other replicas."""
        self.router.warm_until = asyncio.get_running_loop().time() + self.settings.replica_warmup

    async def _held_elsewhere(self, group: str) -> bool:
        """Whether an agent of `group` holds a stream to another live replica (so it will reach this one)."""
        try:
            agents = await self.blocking(self.store.list_agents, group)
            ids = [a.agent_id for a in agents if not a.revoked]
            streams = await self.blocking(self.store.streams_of, ids, self.membership.max_age) if ids else {}
        except Exception:
            return False  # the store is down: explain with what is known
        me = self.replica_id
        return any(s.replica_id != me for rows in streams.values() for s in rows)

    def _tell_agents(self, replicas: list[tunnel_pb2.Replica]) -> None:
        for session in self.registry.all():
            session.send_replicas(replicas)

    async def check_agents(self) -> None:
        """Act on what other replicas changed for this replica's agents: revocations and drains."""
        sessions = {s.agent_id: s for s in self.registry.all() if s.is_open}
        if not sessions:
            return
        for agent_id in await self.blocking(self.store.revoked_among, list(sessions)):
            row = await self.blocking(self.store.get_agent, agent_id)
            reason = row.revoked_reason if row is not None else ""
            log.info("agent %s was revoked (by another replica): closing its stream", agent_id)
            sessions[agent_id].close(f"revoked: {reason}")
        for drain in await self.blocking(self.store.drains_for, list(sessions)):
            session = sessions.get(drain.agent_id)
            if session is not None:
                self.apply_drain(session, drain)

    def apply_drain(self, session: AgentSession, drain: DrainRow) -> None:
        """Carry out an admin's drain on this replica's stream of its agent, once."""
        key = (drain.agent_id, drain.requested_at)
        if key in self._drains_done or drain.requested_at < session.connected_at:
            return  # carried out already, or asked before this stream opened (the agent reconnected since)
        self._drains_done.add(key)
        session.drain(drain.reason or f"drained by {drain.requested_by}", drain.grace, exit_after=drain.exit_after)

    async def _group_facts(self, group: str) -> GroupFacts:
        exists = await self.blocking(self.store.get_group, group) is not None
        profiles = await self.blocking(self.store.profiles_of_group, group) if exists else set()
        return GroupFacts(
            exists=exists,
            known_profiles=frozenset((kinds.profile_kind_named(kind), name) for kind, name in profiles),
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
        group: str,
        kind: int,
        profile: str,
        start: tunnel_pb2.RequestStart,
    ) -> AsyncIterator[RelayedRequest]:
        """Authorize a data request for `group`, send it to one of the group's agents, and yield it.

        Raises InvalidArgument (no group or profile), PermissionDenied (the token may not use the
        group) and what `RelayedRequest.begin` raises; the request's own errors come from iterating it.
        Runs inside the call's observation, which the API's guard opened.
        """
        observation = observe.current()
        assert observation is not None, "data requests run inside the API's guard"
        observation.begin_data_request(kinds.name_of(kind), group, profile)
        principal = await self.authenticate(context)
        observation.principal = principal
        if not group:
            raise InvalidArgument("'group' is required: the agent group to use", reason="MISSING_GROUP", field="group")
        if not profile:
            raise InvalidArgument("'profile' is required: the profile to use", reason="MISSING_PROFILE",
                                  field="profile")
        self.require_group(principal, group)
        remaining = context.time_remaining()
        if remaining is not None:
            # Set field by field: Duration.FromTimedelta is pure Python and costs more than the rest here.
            seconds = max(remaining, 0.001)
            start.timeout.seconds = int(seconds)
            start.timeout.nanos = int((seconds - int(seconds)) * 1e9)
        start.attempt = 1
        call = current_call.get()
        request = RelayedRequest(self.router, Target(group, kind, profile), start, call)
        remove_stopper: Callable[[], None] | None = None
        with tracing.span("relay", kind=SpanKind.CLIENT, attributes={
                "onprem.group": group, "onprem.profile": profile, "onprem.kind": kinds.name_of(kind)}) as relay_span:
            # The agent's spans are children of this one (or, when this process records none, of the call's).
            parent = relay_span if relay_span.is_recording() else tracing.current_span()
            start.trace_context.CopyFrom(tracing.to_proto(parent.get_span_context()))
            request.span = relay_span
            try:
                await request.begin()
                if call is not None:
                    # From now on an ended call fails its request instead of being cancelled.
                    remove_stopper = call.add_stopper(request.fail)
                yield request
            except RequestError as exc:
                tracing.failed(relay_span, exc.code.name, exc.reason)
                raise
            finally:
                if remove_stopper is not None:
                    remove_stopper()
                await request.aclose()
                observation.agent_id = request.agent.agent_id if request.agent is not None else None
                observation.bytes_out = request.bytes_out
                if relay_span.is_recording():
                    relay_span.set_attributes({"onprem.agent_id": observation.agent_id or "",
                                               "onprem.attempts": start.attempt, "onprem.bytes_out": request.bytes_out})

