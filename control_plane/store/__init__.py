"""The control plane's persistent state: groups, agents, tokens and audit rows.

Callers import from here: `Store` (the facade, `store.facade`), the rows it returns
(`store.rows`), what it raises (`store.errors`), and the limits and name rules it
enforces (`store.values`). The modules, by concern:

    values     length limits, name rules, UTC times
    rows       the frozen rows returned, roles and token prefixes
    errors     what the store raises: kinds of the project's error tree (`tunnel.errors`), whose
               code, reason and message go to the caller as they are; a missing row is NotFound
    schema     the tables (`metadata`)
    database   the engine, transactions, clock and `create_schema` (`StoreBase`)
    groups     groups
    agents     agents, their certificates and advertised profiles
    tokens     operator and enrollment tokens, the change counter, token settings
    audit      the audit log
    audit_events  the audit log as the audit API reads it (filters, scope, cursor) and its pruning
    replicas   the replicas sharing the store, their agents' streams, drains, notifications
    facade     `Store`, all of the above in one class
    migrations the schema's Alembic revisions: `upgrade(url)`, `current_revision(url)`
"""

from __future__ import annotations

from onprem.control_plane.store.audit_events import AuditCursor, AuditFilter, AuditScope
from onprem.control_plane.store.database import DEFAULT_DB_FILENAME, default_url
from onprem.control_plane.store.errors import (
    AgentAlreadyExists,
    AgentRevoked,
    EnrollmentTokenExpired,
    EnrollmentTokenInvalid,
    EnrollmentTokenRefused,
    EnrollmentTokenRevoked,
    EnrollmentTokenUsed,
    StoreError,
    UsedEnrollmentTokenNotRevocable,
)
from onprem.control_plane.store.facade import Store
from onprem.control_plane.store.migrations import current_revision, downgrade, head_revision, upgrade
from onprem.control_plane.store.replicas import (
    CHANNEL,
    DRAINING,
    SERVING,
    AgentStreamRow,
    DrainRow,
    ReplicaRow,
)
from onprem.control_plane.store.rows import (
    ALL_GROUPS,
    API_TOKEN_PREFIX,
    ENROLLMENT_TOKEN_PREFIX,
    ROLES,
    ActivityMinute,
    AdvertisedProfile,
    AgentRow,
    ApiTokenRow,
    AuditEntry,
    EnrollmentTokenRow,
    GroupRow,
    Role,
    TokenState,
)
from onprem.control_plane.store.schema import API_TOKENS_COUNTER
from onprem.control_plane.store.tokens import (
    ENROLLMENT_TTL_DEFAULT,
    ENROLLMENT_TTL_MAX,
    OPERATOR_TOKEN_TTL_DEFAULT,
    OPERATOR_TOKEN_TTL_MAX,
    PageKey,
    api_token_id,
    enrollment_token_id,
    parse_token_id,
)
from onprem.control_plane.store.values import (
    ACTOR_MAX,
    DESCRIPTION_MAX,
    REASON_MAX,
    TOKEN_NAME_MAX,
    iso_utc,
    validate_agent_name,
    validate_group_name,
)

__all__ = [
    "ACTOR_MAX",
    "ALL_GROUPS",
    "API_TOKENS_COUNTER",
    "API_TOKEN_PREFIX",
    "CHANNEL",
    "DEFAULT_DB_FILENAME",
    "DESCRIPTION_MAX",
    "DRAINING",
    "ENROLLMENT_TOKEN_PREFIX",
    "ENROLLMENT_TTL_DEFAULT",
    "ENROLLMENT_TTL_MAX",
    "OPERATOR_TOKEN_TTL_DEFAULT",
    "OPERATOR_TOKEN_TTL_MAX",
    "REASON_MAX",
    "ROLES",
    "SERVING",
    "TOKEN_NAME_MAX",
    "ActivityMinute",
    "AdvertisedProfile",
    "AgentAlreadyExists",
    "AgentRevoked",
    "AgentRow",
    "AgentStreamRow",
    "ApiTokenRow",
    "AuditCursor",
    "AuditEntry",
    "AuditFilter",
    "AuditScope",
    "DrainRow",
    "EnrollmentTokenExpired",
    "EnrollmentTokenInvalid",
    "EnrollmentTokenRefused",
    "EnrollmentTokenRevoked",
    "EnrollmentTokenRow",
    "EnrollmentTokenUsed",
    "GroupRow",
    "PageKey",
    "ReplicaRow",
    "Role",
    "Store",
    "StoreError",
    "TokenState",
    "UsedEnrollmentTokenNotRevocable",
    "api_token_id",
    "current_revision",
    "default_url",
    "downgrade",
    "enrollment_token_id",
    "head_revision",
    "iso_utc",
    "parse_token_id",
    "upgrade",
    "validate_agent_name",
    "validate_group_name",
]
