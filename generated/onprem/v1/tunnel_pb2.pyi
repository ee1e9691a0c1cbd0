import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from onprem.v1 import apps_pb2 as _apps_pb2
from onprem.v1 import database_pb2 as _database_pb2
from onprem.v1 import files_pb2 as _files_pb2
from onprem.v1 import profiles_pb2 as _profiles_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RenewRequest(_message.Message):
    __slots__ = ("csr_pem",)
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    csr_pem: str
    def __init__(self, csr_pem: _Optional[str] = ...) -> None: ...

class RenewResponse(_message.Message):
    __slots__ = ("certificate_pem", "expires_at")
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    certificate_pem: str
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, certificate_pem: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ConnectRequest(_message.Message):
    __slots__ = ("request_id", "hello", "chunk", "end", "window_update", "ping", "pong", "status", "batch")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    WINDOW_UPDATE_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    PONG_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    hello: Hello
    chunk: ResponseChunk
    end: ResponseEnd
    window_update: WindowUpdate
    ping: Ping
    pong: Pong
    status: AgentStatus
    batch: AgentFrameBatch
    def __init__(self, request_id: _Optional[int] = ..., hello: _Optional[_Union[Hello, _Mapping]] = ..., chunk: _Optional[_Union[ResponseChunk, _Mapping]] = ..., end: _Optional[_Union[ResponseEnd, _Mapping]] = ..., window_update: _Optional[_Union[WindowUpdate, _Mapping]] = ..., ping: _Optional[_Union[Ping, _Mapping]] = ..., pong: _Optional[_Union[Pong, _Mapping]] = ..., status: _Optional[_Union[AgentStatus, _Mapping]] = ..., batch: _Optional[_Union[AgentFrameBatch, _Mapping]] = ...) -> None: ...

class AgentFrameBatch(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[ConnectRequest]
    def __init__(self, frames: _Optional[_Iterable[_Union[ConnectRequest, _Mapping]]] = ...) -> None: ...

class ConnectResponse(_message.Message):
    __slots__ = ("request_id", "welcome", "start", "data", "cancel", "window_update", "ping", "pong", "drain", "batch", "replicas")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    WINDOW_UPDATE_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    PONG_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    welcome: Welcome
    start: RequestStart
    data: RequestData
    cancel: Cancel
    window_update: WindowUpdate
    ping: Ping
    pong: Pong
    drain: Drain
    batch: ControlFrameBatch
    replicas: ReplicaSet
    def __init__(self, request_id: _Optional[int] = ..., welcome: _Optional[_Union[Welcome, _Mapping]] = ..., start: _Optional[_Union[RequestStart, _Mapping]] = ..., data: _Optional[_Union[RequestData, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ..., window_update: _Optional[_Union[WindowUpdate, _Mapping]] = ..., ping: _Optional[_Union[Ping, _Mapping]] = ..., pong: _Optional[_Union[Pong, _Mapping]] = ..., drain: _Optional[_Union[Drain, _Mapping]] = ..., batch: _Optional[_Union[ControlFrameBatch, _Mapping]] = ..., replicas: _Optional[_Union[ReplicaSet, _Mapping]] = ...) -> None: ...

class ControlFrameBatch(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[ConnectResponse]
    def __init__(self, frames: _Optional[_Iterable[_Union[ConnectResponse, _Mapping]]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("protocol_revisions", "agent_version", "hostname", "profiles", "max_in_flight", "request_window_bytes", "started_at", "capabilities", "held_replica_ids")
    PROTOCOL_REVISIONS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    PROFILES_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_WINDOW_BYTES_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    HELD_REPLICA_IDS_FIELD_NUMBER: _ClassVar[int]
    protocol_revisions: _containers.RepeatedScalarFieldContainer[int]
    agent_version: str
    hostname: str
    profiles: _containers.RepeatedCompositeFieldContainer[_profiles_pb2.Profile]
    max_in_flight: int
    request_window_bytes: int
    started_at: _timestamp_pb2.Timestamp
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    held_replica_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, protocol_revisions: _Optional[_Iterable[int]] = ..., agent_version: _Optional[str] = ..., hostname: _Optional[str] = ..., profiles: _Optional[_Iterable[_Union[_profiles_pb2.Profile, _Mapping]]] = ..., max_in_flight: _Optional[int] = ..., request_window_bytes: _Optional[int] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., capabilities: _Optional[_Iterable[str]] = ..., held_replica_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("protocol_revision", "agent_id", "group", "session_id", "heartbeat_interval", "response_window_bytes", "max_chunk_bytes", "capabilities", "replica", "replicas")
    PROTOCOL_REVISION_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_WINDOW_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    protocol_revision: int
    agent_id: str
    group: str
    session_id: str
    heartbeat_interval: _duration_pb2.Duration
    response_window_bytes: int
    max_chunk_bytes: int
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    replica: Replica
    replicas: _containers.RepeatedCompositeFieldContainer[Replica]
    def __init__(self, protocol_revision: _Optional[int] = ..., agent_id: _Optional[str] = ..., group: _Optional[str] = ..., session_id: _Optional[str] = ..., heartbeat_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., response_window_bytes: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ..., capabilities: _Optional[_Iterable[str]] = ..., replica: _Optional[_Union[Replica, _Mapping]] = ..., replicas: _Optional[_Iterable[_Union[Replica, _Mapping]]] = ...) -> None: ...

class Replica(_message.Message):
    __slots__ = ("replica_id", "agent_address")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    agent_address: str
    def __init__(self, replica_id: _Optional[str] = ..., agent_address: _Optional[str] = ...) -> None: ...

class ReplicaSet(_message.Message):
    __slots__ = ("replicas",)
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    replicas: _containers.RepeatedCompositeFieldContainer[Replica]
    def __init__(self, replicas: _Optional[_Iterable[_Union[Replica, _Mapping]]] = ...) -> None: ...

class RequestStart(_message.Message):
    __slots__ = ("timeout", "has_body", "attempt", "database_query", "file_op", "app_call", "profile_check", "idempotency", "trace_context")
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    HAS_BODY_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    DATABASE_QUERY_FIELD_NUMBER: _ClassVar[int]
    FILE_OP_FIELD_NUMBER: _ClassVar[int]
    APP_CALL_FIELD_NUMBER: _ClassVar[int]
    PROFILE_CHECK_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    timeout: _duration_pb2.Duration
    has_body: bool
    attempt: int
    database_query: _database_pb2.DatabaseQuery
    file_op: _files_pb2.FileOp
    app_call: _apps_pb2.AppCall
    profile_check: _profiles_pb2.CheckProfileRequest
    idempotency: Idempotency
    trace_context: TraceContext
    def __init__(self, timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., has_body: _Optional[bool] = ..., attempt: _Optional[int] = ..., database_query: _Optional[_Union[_database_pb2.DatabaseQuery, _Mapping]] = ..., file_op: _Optional[_Union[_files_pb2.FileOp, _Mapping]] = ..., app_call: _Optional[_Union[_apps_pb2.AppCall, _Mapping]] = ..., profile_check: _Optional[_Union[_profiles_pb2.CheckProfileRequest, _Mapping]] = ..., idempotency: _Optional[_Union[Idempotency, _Mapping]] = ..., trace_context: _Optional[_Union[TraceContext, _Mapping]] = ...) -> None: ...

class TraceContext(_message.Message):
    __slots__ = ("traceparent", "tracestate")
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    TRACESTATE_FIELD_NUMBER: _ClassVar[int]
    traceparent: str
    tracestate: str
    def __init__(self, traceparent: _Optional[str] = ..., tracestate: _Optional[str] = ...) -> None: ...

class Idempotency(_message.Message):
    __slots__ = ("key", "fingerprint")
    KEY_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    key: str
    fingerprint: bytes
    def __init__(self, key: _Optional[str] = ..., fingerprint: _Optional[bytes] = ...) -> None: ...

class RequestData(_message.Message):
    __slots__ = ("data", "end_of_data")
    DATA_FIELD_NUMBER: _ClassVar[int]
    END_OF_DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    end_of_data: bool
    def __init__(self, data: _Optional[bytes] = ..., end_of_data: _Optional[bool] = ...) -> None: ...

class Cancel(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class WindowUpdate(_message.Message):
    __slots__ = ("bytes",)
    BYTES_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    def __init__(self, bytes: _Optional[int] = ...) -> None: ...

class Ping(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: int
    def __init__(self, nonce: _Optional[int] = ...) -> None: ...

class Pong(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: int
    def __init__(self, nonce: _Optional[int] = ...) -> None: ...

class Drain(_message.Message):
    __slots__ = ("reason", "grace_period", "exit_after")
    REASON_FIELD_NUMBER: _ClassVar[int]
    GRACE_PERIOD_FIELD_NUMBER: _ClassVar[int]
    EXIT_AFTER_FIELD_NUMBER: _ClassVar[int]
    reason: str
    grace_period: _duration_pb2.Duration
    exit_after: bool
    def __init__(self, reason: _Optional[str] = ..., grace_period: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., exit_after: _Optional[bool] = ...) -> None: ...

class AgentStatus(_message.Message):
    __slots__ = ("draining", "in_flight", "profiles", "profiles_changed", "profile_health", "agent_in_flight")
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    PROFILES_FIELD_NUMBER: _ClassVar[int]
    PROFILES_CHANGED_FIELD_NUMBER: _ClassVar[int]
    PROFILE_HEALTH_FIELD_NUMBER: _ClassVar[int]
    AGENT_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    draining: bool
    in_flight: int
    profiles: _containers.RepeatedCompositeFieldContainer[_profiles_pb2.Profile]
    profiles_changed: bool
    profile_health: _containers.RepeatedCompositeFieldContainer[_profiles_pb2.ProfileHealth]
    agent_in_flight: int
    def __init__(self, draining: _Optional[bool] = ..., in_flight: _Optional[int] = ..., profiles: _Optional[_Iterable[_Union[_profiles_pb2.Profile, _Mapping]]] = ..., profiles_changed: _Optional[bool] = ..., profile_health: _Optional[_Iterable[_Union[_profiles_pb2.ProfileHealth, _Mapping]]] = ..., agent_in_flight: _Optional[int] = ...) -> None: ...

class ResponseChunk(_message.Message):
    __slots__ = ("query", "list", "stat", "read", "write", "delete", "move", "make_directory", "call", "batch", "transaction", "poll_changes", "poll", "profile_check")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    LIST_FIELD_NUMBER: _ClassVar[int]
    STAT_FIELD_NUMBER: _ClassVar[int]
    READ_FIELD_NUMBER: _ClassVar[int]
    WRITE_FIELD_NUMBER: _ClassVar[int]
    DELETE_FIELD_NUMBER: _ClassVar[int]
    MOVE_FIELD_NUMBER: _ClassVar[int]
    MAKE_DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    CALL_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_FIELD_NUMBER: _ClassVar[int]
    POLL_CHANGES_FIELD_NUMBER: _ClassVar[int]
    POLL_FIELD_NUMBER: _ClassVar[int]
    PROFILE_CHECK_FIELD_NUMBER: _ClassVar[int]
    query: _database_pb2.QueryResponse
    list: _files_pb2.ListResponse
    stat: _files_pb2.StatResponse
    read: _files_pb2.ReadResponse
    write: _files_pb2.WriteResponse
    delete: _files_pb2.DeleteResponse
    move: _files_pb2.MoveResponse
    make_directory: _files_pb2.MakeDirectoryResponse
    call: _apps_pb2.CallResponse
    batch: _database_pb2.ExecuteBatchResponse
    transaction: _database_pb2.ExecuteTransactionResponse
    poll_changes: _database_pb2.PollChangesResponse
    poll: _files_pb2.PollResponse
    profile_check: _profiles_pb2.CheckProfileResponse
    def __init__(self, query: _Optional[_Union[_database_pb2.QueryResponse, _Mapping]] = ..., list: _Optional[_Union[_files_pb2.ListResponse, _Mapping]] = ..., stat: _Optional[_Union[_files_pb2.StatResponse, _Mapping]] = ..., read: _Optional[_Union[_files_pb2.ReadResponse, _Mapping]] = ..., write: _Optional[_Union[_files_pb2.WriteResponse, _Mapping]] = ..., delete: _Optional[_Union[_files_pb2.DeleteResponse, _Mapping]] = ..., move: _Optional[_Union[_files_pb2.MoveResponse, _Mapping]] = ..., make_directory: _Optional[_Union[_files_pb2.MakeDirectoryResponse, _Mapping]] = ..., call: _Optional[_Union[_apps_pb2.CallResponse, _Mapping]] = ..., batch: _Optional[_Union[_database_pb2.ExecuteBatchResponse, _Mapping]] = ..., transaction: _Optional[_Union[_database_pb2.ExecuteTransactionResponse, _Mapping]] = ..., poll_changes: _Optional[_Union[_database_pb2.PollChangesResponse, _Mapping]] = ..., poll: _Optional[_Union[_files_pb2.PollResponse, _Mapping]] = ..., profile_check: _Optional[_Union[_profiles_pb2.CheckProfileResponse, _Mapping]] = ...) -> None: ...

class ResponseEnd(_message.Message):
    __slots__ = ("code", "message", "reason", "field")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    reason: str
    field: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., reason: _Optional[str] = ..., field: _Optional[str] = ...) -> None: ...
