from onprem.v1 import values_pb2 as _values_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class QueryRequest(_message.Message):
    __slots__ = ("group", "profile", "sql", "parameters", "max_rows")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _values_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_values_pb2.Value, _Mapping]] = ...) -> None: ...
    GROUP_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    SQL_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_FIELD_NUMBER: _ClassVar[int]
    group: str
    profile: str
    sql: str
    parameters: _containers.MessageMap[str, _values_pb2.Value]
    max_rows: int
    def __init__(self, group: _Optional[str] = ..., profile: _Optional[str] = ..., sql: _Optional[str] = ..., parameters: _Optional[_Mapping[str, _values_pb2.Value]] = ..., max_rows: _Optional[int] = ...) -> None: ...

class ExecuteQueryRequest(_message.Message):
    __slots__ = ("group", "profile", "sql", "parameters", "max_rows")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _values_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_values_pb2.Value, _Mapping]] = ...) -> None: ...
    GROUP_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    SQL_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_FIELD_NUMBER: _ClassVar[int]
    group: str
    profile: str
    sql: str
    parameters: _containers.MessageMap[str, _values_pb2.Value]
    max_rows: int
    def __init__(self, group: _Optional[str] = ..., profile: _Optional[str] = ..., sql: _Optional[str] = ..., parameters: _Optional[_Mapping[str, _values_pb2.Value]] = ..., max_rows: _Optional[int] = ...) -> None: ...

class ExecuteQueryResponse(_message.Message):
    __slots__ = ("header", "batches", "summary")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    header: QueryHeader
    batches: _containers.RepeatedCompositeFieldContainer[_values_pb2.RowBatch]
    summary: QuerySummary
    def __init__(self, header: _Optional[_Union[QueryHeader, _Mapping]] = ..., batches: _Optional[_Iterable[_Union[_values_pb2.RowBatch, _Mapping]]] = ..., summary: _Optional[_Union[QuerySummary, _Mapping]] = ...) -> None: ...

class QueryResponse(_message.Message):
    __slots__ = ("header", "rows", "summary")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    header: QueryHeader
    rows: _values_pb2.RowBatch
    summary: QuerySummary
    def __init__(self, header: _Optional[_Union[QueryHeader, _Mapping]] = ..., rows: _Optional[_Union[_values_pb2.RowBatch, _Mapping]] = ..., summary: _Optional[_Union[QuerySummary, _Mapping]] = ...) -> None: ...

class QueryHeader(_message.Message):
    __slots__ = ("columns",)
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    columns: _containers.RepeatedCompositeFieldContainer[_values_pb2.Column]
    def __init__(self, columns: _Optional[_Iterable[_Union[_values_pb2.Column, _Mapping]]] = ...) -> None: ...

class QuerySummary(_message.Message):
    __slots__ = ("row_count", "rows_affected", "truncated")
    ROW_COUNT_FIELD_NUMBER: _ClassVar[int]
    ROWS_AFFECTED_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    row_count: int
    rows_affected: int
    truncated: bool
    def __init__(self, row_count: _Optional[int] = ..., rows_affected: _Optional[int] = ..., truncated: _Optional[bool] = ...) -> None: ...

class ParameterSet(_message.Message):
    __slots__ = ("parameters",)
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _values_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_values_pb2.Value, _Mapping]] = ...) -> None: ...
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    parameters: _containers.MessageMap[str, _values_pb2.Value]
    def __init__(self, parameters: _Optional[_Mapping[str, _values_pb2.Value]] = ...) -> None: ...

class ExecuteBatchRequest(_message.Message):
    __slots__ = ("group", "profile", "sql", "parameter_sets")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    SQL_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_SETS_FIELD_NUMBER: _ClassVar[int]
    group: str
    profile: str
    sql: str
    parameter_sets: _containers.RepeatedCompositeFieldContainer[ParameterSet]
    def __init__(self, group: _Optional[str] = ..., profile: _Optional[str] = ..., sql: _Optional[str] = ..., parameter_sets: _Optional[_Iterable[_Union[ParameterSet, _Mapping]]] = ...) -> None: ...

class ExecuteBatchResponse(_message.Message):
    __slots__ = ("rows_affected", "sets_applied")
    ROWS_AFFECTED_FIELD_NUMBER: _ClassVar[int]
    SETS_APPLIED_FIELD_NUMBER: _ClassVar[int]
    rows_affected: int
    sets_applied: int
    def __init__(self, rows_affected: _Optional[int] = ..., sets_applied: _Optional[int] = ...) -> None: ...

class Statement(_message.Message):
    __slots__ = ("sql", "parameters")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _values_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_values_pb2.Value, _Mapping]] = ...) -> None: ...
    SQL_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    sql: str
    parameters: _containers.MessageMap[str, _values_pb2.Value]
    def __init__(self, sql: _Optional[str] = ..., parameters: _Optional[_Mapping[str, _values_pb2.Value]] = ...) -> None: ...

class ExecuteTransactionRequest(_message.Message):
    __slots__ = ("group", "profile", "statements")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    STATEMENTS_FIELD_NUMBER: _ClassVar[int]
    group: str
    profile: str
    statements: _containers.RepeatedCompositeFieldContainer[Statement]
    def __init__(self, group: _Optional[str] = ..., profile: _Optional[str] = ..., statements: _Optional[_Iterable[_Union[Statement, _Mapping]]] = ...) -> None: ...

class StatementResult(_message.Message):
    __slots__ = ("rows_affected",)
    ROWS_AFFECTED_FIELD_NUMBER: _ClassVar[int]
    rows_affected: int
    def __init__(self, rows_affected: _Optional[int] = ...) -> None: ...

class ExecuteTransactionResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[StatementResult]
    def __init__(self, results: _Optional[_Iterable[_Union[StatementResult, _Mapping]]] = ...) -> None: ...

class Watermark(_message.Message):
    __slots__ = ("value", "key")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    value: _values_pb2.Value
    key: _values_pb2.Value
    def __init__(self, value: _Optional[_Union[_values_pb2.Value, _Mapping]] = ..., key: _Optional[_Union[_values_pb2.Value, _Mapping]] = ...) -> None: ...

class PollChangesRequest(_message.Message):
    __slots__ = ("group", "profile", "table", "sql", "watermark_column", "key_column", "after", "max_rows", "parameters")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _values_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_values_pb2.Value, _Mapping]] = ...) -> None: ...
    GROUP_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    SQL_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_COLUMN_FIELD_NUMBER: _ClassVar[int]
    KEY_COLUMN_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    group: str
    profile: str
    table: str
    sql: str
    watermark_column: str
    key_column: str
    after: Watermark
    max_rows: int
    parameters: _containers.MessageMap[str, _values_pb2.Value]
    def __init__(self, group: _Optional[str] = ..., profile: _Optional[str] = ..., table: _Optional[str] = ..., sql: _Optional[str] = ..., watermark_column: _Optional[str] = ..., key_column: _Optional[str] = ..., after: _Optional[_Union[Watermark, _Mapping]] = ..., max_rows: _Optional[int] = ..., parameters: _Optional[_Mapping[str, _values_pb2.Value]] = ...) -> None: ...

class PollChangesSummary(_message.Message):
    __slots__ = ("row_count", "next", "has_more")
    ROW_COUNT_FIELD_NUMBER: _ClassVar[int]
    NEXT_FIELD_NUMBER: _ClassVar[int]
    HAS_MORE_FIELD_NUMBER: _ClassVar[int]
    row_count: int
    next: Watermark
    has_more: bool
    def __init__(self, row_count: _Optional[int] = ..., next: _Optional[_Union[Watermark, _Mapping]] = ..., has_more: _Optional[bool] = ...) -> None: ...

class PollChangesResponse(_message.Message):
    __slots__ = ("header", "rows", "summary")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    header: QueryHeader
    rows: _values_pb2.RowBatch
    summary: PollChangesSummary
    def __init__(self, header: _Optional[_Union[QueryHeader, _Mapping]] = ..., rows: _Optional[_Union[_values_pb2.RowBatch, _Mapping]] = ..., summary: _Optional[_Union[PollChangesSummary, _Mapping]] = ...) -> None: ...

class DatabaseQuery(_message.Message):
    __slots__ = ("query", "batch", "transaction", "poll_changes")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_FIELD_NUMBER: _ClassVar[int]
    POLL_CHANGES_FIELD_NUMBER: _ClassVar[int]
    query: QueryRequest
    batch: ExecuteBatchRequest
    transaction: ExecuteTransactionRequest
    poll_changes: PollChangesRequest
    def __init__(self, query: _Optional[_Union[QueryRequest, _Mapping]] = ..., batch: _Optional[_Union[ExecuteBatchRequest, _Mapping]] = ..., transaction: _Optional[_Union[ExecuteTransactionRequest, _Mapping]] = ..., poll_changes: _Optional[_Union[PollChangesRequest, _Mapping]] = ...) -> None: ...
