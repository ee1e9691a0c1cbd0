"""One record per operator call: who made it, what it touched, how it ended; its audit row and metrics.

Every call on the operator listener runs inside `Observer.observe` (the API's guard opens it when the
call arrives), and so does every enrollment. Services only fill in what they learn on the call's
`Observation` (`observe.current()`): the relay the group, profile, agent and bytes of a data request,
an admin RPC what it changed. When the call ends, this module alone turns the observation into an
audit row and, for data requests, into metrics.

Which calls leave a row:
- every refused call: with the token's name, or as "anonymous" with the caller's address. Refusals
  without a valid token are rows up to a budget per address; past it they are counted and summarised
  in one row per address every few seconds (`run_summaries`), so that a flood cannot grow the audit
  log faster than that. Refusals of a valid token are all rows: it can be revoked.
- every data request (database, folder, app), however it ended, cancelled included;
- every admin action that changed something (the service calls `Observation.record`).
Successful reads (ListAgents, GetAgent, ListTokens...) leave none.

A data request's row holds its error's reason only (its message may quote the caller's SQL or paths);
other rows hold "REASON: message", which says a person what was refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from onprem.control_plane import metrics
from onprem.control_plane.audit import AuditLog
from onprem.control_plane.auth import Principal
from onprem.control_plane.credentials import TokenRefused
from onprem.control_plane.store import AuditEntry
from onprem.control_plane.throttle import RowLimiter, peer_key
from onprem.tunnel import tracing
from onprem.tunnel.errors import Code, Internal, RequestError

log = logging.getLogger("onprem.control_plane.observe")

#: The principal of calls that came without a valid token.
ANONYMOUS = "anonymous"
_current: contextvars.ContextVar[Observation | None] = contextvars.ContextVar("observation", default=None)


def current() -> Observation | None:
    """The observation of the call this task serves, if it runs inside one."""
    return _current.get()


def record(detail: str = "", *, group: str | None = None, agent_id: str | None = None) -> None:
    """Have the current call leave an audit row when it ends well (`Observation.record`)."""
    observation = current()
    if observation is not None:
        observation.record(detail, group=group, agent_id=agent_id)


@dataclass
class Observation:
    """What one call did, filled in as it runs."""

    method: str
    #: The caller's address, asked when the call arrived (grpc's peer() on an ended call crashes).
    peer: str
    #: "database", "folder", "app" for data requests; "admin", "request", "enroll" or "auth" otherwise.
    kind: str
    began: float
    #: Who made the call, once authenticated.
    principal: Principal | None = None
    #: The role to record for a call that has no principal (an agent enrolling).
    role: str = ""
    group: str | None = None
    profile: str | None = None
    agent_id: str | None = None
    bytes_out: int = 0
    #: What a successful call changed, for its row (e.g. "token 3f2a…").
    detail: str = ""
    #: Put before the refusal's reason in its row (e.g. which enrollment token was tried).
    note: str = ""
    #: Whether a successful call leaves a row; data requests and admin actions set it.
    audited: bool = False
    #: The error the call ended with, as the error boundary sent it; None while it runs or on success.
    outcome: RequestError | None = None
    #: The principal's name to record instead of the token's (an enrollment records its token).
    principal_name: str | None = None
    #: Whether the call relays a request to an agent (`begin_data_request`).
    data_request: bool = False
    #: The W3C trace id of the call (`tunnel.tracing`), "" when it runs in none (enrollments).
    trace_id: str = ""

    def record(self, detail: str = "", *, group: str | None = None, agent_id: str | None = None,
               kind: str | None = None, principal_name: str | None = None) -> None:
        """Have this call leave an audit row when it ends well: an admin action that changed something."""
        self.audited = True
        self.detail = detail or self.detail
        self.group = group if group is not None else self.group
        self.agent_id = agent_id if agent_id is not None else self.agent_id
        self.kind = kind or self.kind
        self.principal_name = principal_name or self.principal_name

    def begin_data_request(self, kind: str, group: str, profile: str) -> None:
        """From now on this call is a data request of `kind`: counted in flight, always audited."""
        self.kind, self.group, self.profile = kind, group, profile
        self.audited = self.data_request = True
        metrics.child(metrics.IN_FLIGHT, kind).inc()


class Observer:
    """Opens observations and files what they saw: audit rows through `AuditLog`, and metrics."""

    def __init__(self, audit: AuditLog, refusal_rows: RowLimiter) -> None:
        self._audit = audit
        self._refusal_rows = refusal_rows

    @contextmanager
    def observe(self, *, method: str, peer: str, kind: str, principal: Principal | None = None,
                role: str = "") -> Iterator[Observation]:
        """Observe one call for as long as the block runs; its end (error, cancellation) is its outcome."""
        observation = Observation(method=method, peer=peer, kind=kind, began=time.monotonic(),
                                  principal=principal, role=role, trace_id=tracing.current_trace_id())
        token = _current.set(observation)
        cancelled = False
        try:
            yield observation
        except RequestError as exc:
            observation.outcome = observation.outcome or exc
            raise
        except (asyncio.CancelledError, GeneratorExit):
            cancelled = observation.outcome is None
            raise
        except BaseException:
            # grpc's AbortError once the boundary noted the outcome; anything else is a bug.
            if observation.outcome is None:
                observation.outcome = Internal("internal error in the control plane", reason="INTERNAL")
            raise
        finally:
            # A streaming call's generator may be closed from another context; the variable then dies
            # with the call's task anyway.
            with contextlib.suppress(ValueError):
                _current.reset(token)
            self._finish(observation, cancelled=cancelled)

    def refuse(self, *, method: str, peer: str, error: RequestError) -> None:
        """The row of a call refused before it could be served (no valid token)."""
        with self.observe(method=method, peer=peer, kind="auth") as observation:
            observation.outcome = error

    def _finish(self, observation: Observation, *, cancelled: bool = False) -> None:
        error = observation.outcome
        code = error.code if error is not None else (Code.CANCELLED if cancelled else Code.OK)
        if observation.data_request:
            self._count(observation, code)
            # Logged in the call's task: the line carries its trace id (`tunnel.logs`).
            log.debug("%s (%s %s/%s) by agent %s ended %s", observation.method, observation.kind, observation.group,
                      observation.profile, observation.agent_id or "none", code.name)
        if code != Code.OK:
            tracing.failed(tracing.current_span(), code.name, error.reason if error is not None else "")
        if error is None and not (observation.audited and (observation.data_request or not cancelled)):
            return
        principal = observation.principal
        name, role, token_id = ANONYMOUS, observation.role, None
        if principal is not None:
            name, role, token_id = principal.name, principal.role, principal.token_id
        elif isinstance(error, TokenRefused):
            name, role, token_id = error.name, error.role, error.token_id
        if error is not None and principal is None and not self._refusal_rows.allow(
                peer_key(observation.peer), (observation.method, error.code.name, observation.kind)):
            return
        if observation.data_request:
            detail = error.reason if error is not None else ("caller went away" if cancelled else "")
        elif error is not None:
            detail = f"{observation.note}{error.reason}: {error.message}"
        else:
            detail = observation.detail
        self._audit.record(AuditEntry(
            at=dt.datetime.now(dt.UTC), principal=observation.principal_name or name, role=role,
            method=observation.method, kind=observation.kind, code=int(code), outcome=code.name,
            group_name=observation.group, agent_id=observation.agent_id, profile=observation.profile,
            bytes_out=observation.bytes_out, duration_ms=int((time.monotonic() - observation.began) * 1000),
            detail=detail, token_id=token_id, peer=observation.peer, trace_id=observation.trace_id or None,
        ))

    @staticmethod
    def _count(observation: Observation, code: Code) -> None:
        kind = observation.kind
        metrics.child(metrics.IN_FLIGHT, kind).dec()
        metrics.child(metrics.REQUESTS, kind, observation.method.rsplit("/", 1)[-1], code.name).inc()
        metrics.child(metrics.LATENCY, kind).observe(time.monotonic() - observation.began)
        metrics.child(metrics.RESPONSE_BYTES, kind).inc(observation.bytes_out)

    async def run_summaries(self, interval: float = 5.0) -> None:
        """Every `interval`, one row per address for the refusals left out of the audit; until cancelled."""
        try:
            while True:
                await asyncio.sleep(interval)
                self._write_summaries()
        finally:
            self._write_summaries()

    def _write_summaries(self) -> None:
        for (key, (method, outcome, kind)), count in self._refusal_rows.drain().items():
            code = Code[outcome]
            self._audit.record(AuditEntry(
                at=dt.datetime.now(dt.UTC), principal=ANONYMOUS, role="", method=method, kind=kind,
                code=int(code), outcome=outcome, peer=key,
                detail=f"SUMMARY: {count} more {outcome} refusals of calls without a valid token from {key}, "
                       "not audited one by one",
            ))
