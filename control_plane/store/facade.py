"""`Store`: the one object callers hold, made of one class per concern.

Written against SQLAlchemy Core so that one code path serves the embedded SQLite
file and a PostgreSQL database shared by several replicas. Every method runs in
its own short transaction (`database`) and returns frozen rows (`rows`) with
timezone-aware UTC datetimes, whatever the database hands back.
"""

from __future__ import annotations

from onprem.control_plane.store.agents import AgentStore
from onprem.control_plane.store.audit import AuditStore
from onprem.control_plane.store.audit_events import AuditEventStore
from onprem.control_plane.store.replicas import ReplicaStore
from onprem.control_plane.store.tokens import TokenStore


class Store(AgentStore, TokenStore, AuditStore, AuditEventStore, ReplicaStore):
    """The control plane's state, in SQLite (embedded) or PostgreSQL (shared by replicas).

    Groups (`groups`), agents (`agents`), operator and enrollment tokens with their change
    counter and settings (`tokens`), the audit log (`audit`; read by the audit API and pruned: `audit_events`), and the replicas with their agent streams,
    drains and notifications (`replicas`).
    """
