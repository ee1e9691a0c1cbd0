import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProfileKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROFILE_KIND_UNSPECIFIED: _ClassVar[ProfileKind]
    PROFILE_KIND_DATABASE: _ClassVar[ProfileKind]
    PROFILE_KIND_FOLDER: _ClassVar[ProfileKind]
    PROFILE_KIND_APP: _ClassVar[ProfileKind]
PROFILE_KIND_UNSPECIFIED: ProfileKind
PROFILE_KIND_DATABASE: ProfileKind
PROFILE_KIND_FOLDER: ProfileKind
PROFILE_KIND_APP: ProfileKind

class Profile(_message.Message):
    __slots__ = ("name", "kind", "read_only", "dialect")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    DIALECT_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: ProfileKind
    read_only: bool
    dialect: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[ProfileKind, str]] = ..., read_only: _Optional[bool] = ..., dialect: _Optional[str] = ...) -> None: ...

class CheckProfileRequest(_message.Message):
    __slots__ = ("group", "profile", "kind")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    group: str
    profile: str
    kind: ProfileKind
    def __init__(self, group: _Optional[str] = ..., profile: _Optional[str] = ..., kind: _Optional[_Union[ProfileKind, str]] = ...) -> None: ...

class ProfileCheck(_message.Message):
    __slots__ = ("name", "ok", "message", "warning")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    WARNING_FIELD_NUMBER: _ClassVar[int]
    name: str
    ok: bool
    message: str
    warning: bool
    def __init__(self, name: _Optional[str] = ..., ok: _Optional[bool] = ..., message: _Optional[str] = ..., warning: _Optional[bool] = ...) -> None: ...

class ProfileHealth(_message.Message):
    __slots__ = ("profile", "kind", "ok", "checks", "checked_at")
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    CHECKED_AT_FIELD_NUMBER: _ClassVar[int]
    profile: str
    kind: ProfileKind
    ok: bool
    checks: _containers.RepeatedCompositeFieldContainer[ProfileCheck]
    checked_at: _timestamp_pb2.Timestamp
    def __init__(self, profile: _Optional[str] = ..., kind: _Optional[_Union[ProfileKind, str]] = ..., ok: _Optional[bool] = ..., checks: _Optional[_Iterable[_Union[ProfileCheck, _Mapping]]] = ..., checked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CheckProfileResponse(_message.Message):
    __slots__ = ("agent_id", "checks", "ok")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    checks: _containers.RepeatedCompositeFieldContainer[ProfileCheck]
    ok: bool
    def __init__(self, agent_id: _Optional[str] = ..., checks: _Optional[_Iterable[_Union[ProfileCheck, _Mapping]]] = ..., ok: _Optional[bool] = ...) -> None: ...
