"""When a request may go to another agent of its group, and what the operator is told when it may not.

A request is re-routed only when doing so cannot make it run twice:
- the agent refused it before starting it (`AgentRefused`: draining, at its limit), up to
  `MAX_REFUSALS` times; or
- the agent was lost (`AgentLost`), the request is idempotent (reads, lists, stats, GET/HEAD app
  calls, queries on read-only profiles, profile checks: `tunnel.kinds` decides) or carries an
  idempotency key (the agents record its outcome where the write is, so a retry answers from the
  record if it ran), nothing of its result has reached the operator yet, and its body, if any, was
  sent whole and is kept to send again (`RelayedRequest`); this happens at most once.
Anything else fails with UNAVAILABLE saying whether the request may have run. This module is the
policy only; `relay.RelayedRequest` acts on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from onprem.control_plane import metrics
from onprem.control_plane.sessions import AgentSession
from onprem.tunnel import kinds
from onprem.tunnel.errors import AgentLost, AgentRefused, RequestError
from onprem.tunnel.idempotency import is_keyed
from onprem.v1 import tunnel_pb2

#: How often a refused request is offered to another agent.
MAX_REFUSALS = 3


def is_idempotent(start: tunnel_pb2.RequestStart, session: AgentSession) -> bool:
    """Whether running `start` twice is harmless, on the agent that ran it (`tunnel.kinds` decides)."""
    kind = kinds.by_payload(start.WhichOneof("payload"))
    read_only = kind is kinds.DATABASE and session.profile_is_read_only(kinds.DATABASE.profile_of(start))
    return kinds.is_idempotent(start, read_only)


@dataclass
class Attempts:
    """The re-routes one request has had so far."""

    refusals: int = 0
    lost: int = 0

    def may_retry(self, error: RequestError, start: tunnel_pb2.RequestStart, session: AgentSession,
                  *, delivered: bool, body_replayable: bool = False) -> bool:
        """Whether `error` from `session` lets the request go to another agent; counts the retry if so.

        `body_replayable`: the request's whole body was sent and is kept, to send again.
        """
        if delivered or (start.has_body and not body_replayable):
            return False
        if isinstance(error, AgentRefused) and self.refusals < MAX_REFUSALS:
            self.refusals += 1
        elif isinstance(error, AgentLost) and self.lost == 0 and (is_idempotent(start, session)
                                                                   or is_keyed(start)):
            self.lost += 1
        else:
            return False
        metrics.RETRIES.labels(error.reason.lower()).inc()
        return True


def explain(error: RequestError, start: tunnel_pb2.RequestStart, session: AgentSession | None, *,
            delivered: bool) -> RequestError:
    """The error the operator gets: a lost agent's says whether the request may have run."""
    if not isinstance(error, AgentLost) or session is None:
        return error
    cause = error.cause
    who = f"agent {session.name} ({session.agent_id})" + (f", {cause}," if cause else "")
    if delivered:
        return AgentLost(f"{who} was lost after part of the result was sent; the result is incomplete, "
                         f"retry the request")
    if is_idempotent(start, session):
        return AgentLost(f"{who} was lost while running the request, and no other agent of the group "
                         f"could take it; it changed nothing, so it is safe to retry")
    if is_keyed(start):
        return AgentLost(f"{who} was lost while running the request, and it was not retried on another agent; "
                         f"it may have run, and its outcome is recorded under idempotency key "
                         f"'{start.idempotency.key}' if it did: retry with the same key to get that outcome, or "
                         f"to run it if it did not")
    return AgentLost(f"{who} was lost while running the request; it may have run in part or in full, "
                     f"so check its effects before retrying")
