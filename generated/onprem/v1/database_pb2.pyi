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

class DatabaseQuery(_message.Message):
    __slots__ = ("query",)
    QUERY_FIELD_NUMBER: _ClassVar[int]
    query: QueryRequest
    def __init__(self, query: _Optional[_Union[QueryRequest, _Mapping]] = ...) -> None: ...
