from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ValueType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VALUE_TYPE_UNSPECIFIED: _ClassVar[ValueType]
    VALUE_TYPE_BOOL: _ClassVar[ValueType]
    VALUE_TYPE_INT64: _ClassVar[ValueType]
    VALUE_TYPE_DOUBLE: _ClassVar[ValueType]
    VALUE_TYPE_DECIMAL: _ClassVar[ValueType]
    VALUE_TYPE_STRING: _ClassVar[ValueType]
    VALUE_TYPE_BYTES: _ClassVar[ValueType]
    VALUE_TYPE_DATE: _ClassVar[ValueType]
    VALUE_TYPE_TIME: _ClassVar[ValueType]
    VALUE_TYPE_TIMESTAMP: _ClassVar[ValueType]
    VALUE_TYPE_TIMESTAMP_TZ: _ClassVar[ValueType]
    VALUE_TYPE_INTERVAL: _ClassVar[ValueType]
    VALUE_TYPE_UUID: _ClassVar[ValueType]
    VALUE_TYPE_JSON: _ClassVar[ValueType]
    VALUE_TYPE_ARRAY: _ClassVar[ValueType]
VALUE_TYPE_UNSPECIFIED: ValueType
VALUE_TYPE_BOOL: ValueType
VALUE_TYPE_INT64: ValueType
VALUE_TYPE_DOUBLE: ValueType
VALUE_TYPE_DECIMAL: ValueType
VALUE_TYPE_STRING: ValueType
VALUE_TYPE_BYTES: ValueType
VALUE_TYPE_DATE: ValueType
VALUE_TYPE_TIME: ValueType
VALUE_TYPE_TIMESTAMP: ValueType
VALUE_TYPE_TIMESTAMP_TZ: ValueType
VALUE_TYPE_INTERVAL: ValueType
VALUE_TYPE_UUID: ValueType
VALUE_TYPE_JSON: ValueType
VALUE_TYPE_ARRAY: ValueType

class Value(_message.Message):
    __slots__ = ("null_value", "bool_value", "int64_value", "double_value", "decimal_value", "string_value", "bytes_value", "date_value", "time_value", "timestamp_value", "uuid_value", "json_value", "interval_value", "array_value")
    NULL_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT64_VALUE_FIELD_NUMBER: _ClassVar[int]
    DOUBLE_VALUE_FIELD_NUMBER: _ClassVar[int]
    DECIMAL_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    BYTES_VALUE_FIELD_NUMBER: _ClassVar[int]
    DATE_VALUE_FIELD_NUMBER: _ClassVar[int]
    TIME_VALUE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_VALUE_FIELD_NUMBER: _ClassVar[int]
    UUID_VALUE_FIELD_NUMBER: _ClassVar[int]
    JSON_VALUE_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_VALUE_FIELD_NUMBER: _ClassVar[int]
    ARRAY_VALUE_FIELD_NUMBER: _ClassVar[int]
    null_value: bool
    bool_value: bool
    int64_value: int
    double_value: float
    decimal_value: str
    string_value: str
    bytes_value: bytes
    date_value: str
    time_value: str
    timestamp_value: str
    uuid_value: str
    json_value: str
    interval_value: str
    array_value: ValueList
    def __init__(self, null_value: _Optional[bool] = ..., bool_value: _Optional[bool] = ..., int64_value: _Optional[int] = ..., double_value: _Optional[float] = ..., decimal_value: _Optional[str] = ..., string_value: _Optional[str] = ..., bytes_value: _Optional[bytes] = ..., date_value: _Optional[str] = ..., time_value: _Optional[str] = ..., timestamp_value: _Optional[str] = ..., uuid_value: _Optional[str] = ..., json_value: _Optional[str] = ..., interval_value: _Optional[str] = ..., array_value: _Optional[_Union[ValueList, _Mapping]] = ...) -> None: ...

class ValueList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[Value]
    def __init__(self, values: _Optional[_Iterable[_Union[Value, _Mapping]]] = ...) -> None: ...

class Column(_message.Message):
    __slots__ = ("name", "type", "database_type", "nullable")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DATABASE_TYPE_FIELD_NUMBER: _ClassVar[int]
    NULLABLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: ValueType
    database_type: str
    nullable: bool
    def __init__(self, name: _Optional[str] = ..., type: _Optional[_Union[ValueType, str]] = ..., database_type: _Optional[str] = ..., nullable: _Optional[bool] = ...) -> None: ...

class ColumnValues(_message.Message):
    __slots__ = ("nulls", "bool_values", "int64_values", "double_values", "string_values", "bytes_values")
    NULLS_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUES_FIELD_NUMBER: _ClassVar[int]
    INT64_VALUES_FIELD_NUMBER: _ClassVar[int]
    DOUBLE_VALUES_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUES_FIELD_NUMBER: _ClassVar[int]
    BYTES_VALUES_FIELD_NUMBER: _ClassVar[int]
    nulls: _containers.RepeatedScalarFieldContainer[bool]
    bool_values: _containers.RepeatedScalarFieldContainer[bool]
    int64_values: _containers.RepeatedScalarFieldContainer[int]
    double_values: _containers.RepeatedScalarFieldContainer[float]
    string_values: _containers.RepeatedScalarFieldContainer[str]
    bytes_values: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, nulls: _Optional[_Iterable[bool]] = ..., bool_values: _Optional[_Iterable[bool]] = ..., int64_values: _Optional[_Iterable[int]] = ..., double_values: _Optional[_Iterable[float]] = ..., string_values: _Optional[_Iterable[str]] = ..., bytes_values: _Optional[_Iterable[bytes]] = ...) -> None: ...

class RowBatch(_message.Message):
    __slots__ = ("row_count", "columns")
    ROW_COUNT_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    row_count: int
    columns: _containers.RepeatedCompositeFieldContainer[ColumnValues]
    def __init__(self, row_count: _Optional[int] = ..., columns: _Optional[_Iterable[_Union[ColumnValues, _Mapping]]] = ...) -> None: ...
