"""Server reflection, `grpc.reflection.v1` and `grpc.reflection.v1alpha`, from descriptors that keep the protos'
comments.

grpcio-reflection serves v1alpha only, from the descriptors compiled into the `_pb2` modules, and protoc
leaves the comments out of those: `grpcurl describe onprem.v1.QueryRequest` showed fields without a word of
their documentation. `make proto` also writes every proto, with its imports and source info (the comments),
into one descriptor set (`generated/onprem/v1/descriptors.binpb`, imported as `onprem.v1`), and this module
answers both protocols from it: recent clients (grpcurl, buf curl, grpcui, Postman) ask for v1 first, older
ones for v1alpha. Services from elsewhere (grpc.health.v1, reflection v1alpha itself) are added from their
modules' descriptors, without comments.

The two protocols are the same messages in two packages; each is answered with its own message classes
(v1's made from its descriptor in the set). Every question gets one answer on the stream, in order; one that
cannot be answered gets an `error_response` (NOT_FOUND for an unknown file, symbol, extension or type;
INVALID_ARGUMENT for an empty question) and the stream goes on. As grpc-go does, a file's imports are sent
once per stream: the file asked for always, each import only the first time it is needed.

Reflection is public (no token), as the health service is (`guard.PUBLIC_PREFIXES`): the protos are public.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FileDescriptor
from google.protobuf.message import Message
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

#: The descriptor set `make proto` writes next to the generated code.
DESCRIPTOR_SET = "descriptors.binpb"
V1 = "grpc.reflection.v1.ServerReflection"
V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
SERVICE_NAMES = (V1, V1ALPHA)
_METHOD = "ServerReflectionInfo"

Context = grpc.aio.ServicerContext[Any, Any]


def load_descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    """The descriptor set of our protos and their imports, with source info, as `make proto` wrote it."""
    data = importlib.resources.files("onprem.v1").joinpath(DESCRIPTOR_SET).read_bytes()
    return descriptor_pb2.FileDescriptorSet.FromString(data)


def _symbols(file: descriptor_pb2.FileDescriptorProto) -> Iterator[str]:
    """Every fully-qualified name a file defines: messages (nested too), their fields, oneofs and nested enums,
    enums and their values (which protobuf scopes beside their enum), services and methods, extensions."""
    package = f"{file.package}." if file.package else ""

    def enums(scope: str, items: Iterable[descriptor_pb2.EnumDescriptorProto]) -> Iterator[str]:
        for enum in items:
            yield scope + enum.name
            yield from (scope + value.name for value in enum.value)

    def messages(scope: str, items: Iterable[descriptor_pb2.DescriptorProto]) -> Iterator[str]:
        for message in items:
            name = scope + message.name
            yield name
            yield from (f"{name}.{f.name}" for f in message.field)
            yield from (f"{name}.{f.name}" for f in message.extension)
            yield from (f"{name}.{o.name}" for o in message.oneof_decl)
            yield from enums(f"{name}.", message.enum_type)
            yield from messages(f"{name}.", message.nested_type)

    yield from messages(package, file.message_type)
    yield from enums(package, file.enum_type)
    yield from (package + extension.name for extension in file.extension)
    for service in file.service:
        yield package + service.name
        yield from (f"{package}{service.name}.{method.name}" for method in service.method)


def _message_names(file: descriptor_pb2.FileDescriptorProto) -> Iterator[str]:
    def walk(scope: str, items: Iterable[descriptor_pb2.DescriptorProto]) -> Iterator[str]:
        for message in items:
            yield scope + message.name
            yield from walk(f"{scope}{message.name}.", message.nested_type)

    yield from walk(f"{file.package}." if file.package else "", file.message_type)


def _extensions(file: descriptor_pb2.FileDescriptorProto) -> Iterator[tuple[str, int]]:
    """(extended message, field number) of every extension the file declares, at top level or in a message."""
    def walk(extensions: Iterable[descriptor_pb2.FieldDescriptorProto],
             nested: Iterable[descriptor_pb2.DescriptorProto]) -> Iterator[tuple[str, int]]:
        for extension in extensions:
            yield extension.extendee.lstrip("."), extension.number
        for message in nested:
            yield from walk(message.extension, message.nested_type)

    yield from walk(file.extension, file.message_type)


def _drop_json_names(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    """Serve fields without the `json_name` that protoc writes into descriptor sets (and not into generated code).

    grpcurl prints and reads JSON by a field's json_name when the descriptor has one: with it, its output
    would turn from the protos' names (`agent_id`, as the docs and operators' scripts read it) to lowerCamel.
    Without it, clients use the field's own name, as they did when reflection served the generated code's
    descriptors.
    """
    for message in messages:
        for field in (*message.field, *message.extension):
            field.ClearField("json_name")
        _drop_json_names(message.nested_type)


class Descriptors:
    """Files by name (serialized as served), what they import, and which file defines each symbol."""

    def __init__(self, files: Iterable[descriptor_pb2.FileDescriptorProto]) -> None:
        self.files: dict[str, bytes] = {}
        self.imports: dict[str, tuple[str, ...]] = {}
        self.symbols: dict[str, str] = {}
        self.extensions: dict[tuple[str, int], str] = {}
        self.messages: set[str] = set()
        for file in files:
            if file.name in self.files:
                continue  # the set's copy (with comments) wins over a module's
            self.files[file.name] = file.SerializeToString()
            self.imports[file.name] = tuple(file.dependency)
            for symbol in _symbols(file):
                self.symbols.setdefault(symbol, file.name)
            for key in _extensions(file):
                self.extensions.setdefault(key, file.name)
            self.messages.update(_message_names(file))

    @classmethod
    def load(cls, modules: Sequence[FileDescriptor] = ()) -> Descriptors:
        """The descriptor set, then the files of `modules` (descriptors of generated code) it lacks."""
        files = list(load_descriptor_set().file)
        for file in files:
            for extension in file.extension:
                extension.ClearField("json_name")
            _drop_json_names(file.message_type)
        for module in modules:
            proto = descriptor_pb2.FileDescriptorProto()
            module.CopyToProto(proto)
            files.append(proto)
        return cls(files)

    def with_imports(self, name: str, sent: set[str]) -> list[bytes]:
        """The file `name`, then every file it imports, directly or not, that is not in `sent` (which grows)."""
        answer, queue, seen = [], [name], set()
        while queue:
            current = queue.pop(0)
            if current in seen or current not in self.files:
                continue
            seen.add(current)
            if current == name or current not in sent:
                answer.append(self.files[current])
                sent.add(current)
            queue.extend(self.imports[current])
        return answer

    def extension_numbers(self, message: str) -> list[int]:
        return sorted(number for (extended, number) in self.extensions if extended == message)


@dataclass(frozen=True)
class _Protocol:
    """One version of the protocol: its request and response classes."""

    request: type[Message]
    response: type[Message]


def _v1_protocol(descriptors: descriptor_pb2.FileDescriptorSet) -> _Protocol:
    pool = descriptor_pool.DescriptorPool()
    [v1] = [f for f in descriptors.file if f.package == "grpc.reflection.v1"]
    pool.Add(v1)
    return _Protocol(
        request=message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionRequest")),
        response=message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse")),
    )


class Reflection:
    """Answers reflection questions about the `services` a server serves and every file it knows."""

    def __init__(self, services: Sequence[str], descriptors: Descriptors | None = None,
                 modules: Sequence[FileDescriptor] = ()) -> None:
        self._services = sorted({*services, *SERVICE_NAMES})
        self._descriptors = descriptors or Descriptors.load([*modules, v1alpha_pb2.DESCRIPTOR])
        self._protocols = {V1: _v1_protocol(load_descriptor_set()),
                           V1ALPHA: _Protocol(v1alpha_pb2.ServerReflectionRequest, v1alpha_pb2.ServerReflectionResponse)}

    def answer(self, request: Any, response: Any, sent: set[str]) -> None:
        """Fill in `response` (of the request's protocol) for one question; `sent`: files sent on this stream."""
        response.valid_host = request.host
        response.original_request.CopyFrom(request)
        d = self._descriptors
        asked = request.WhichOneof("message_request")
        if asked == "list_services":
            for name in self._services:
                response.list_services_response.service.add(name=name)
        elif asked == "file_by_filename":
            name = request.file_by_filename
            if name not in d.files:
                return self._error(response, grpc.StatusCode.NOT_FOUND, f"no file named '{name}'")
            response.file_descriptor_response.file_descriptor_proto.extend(d.with_imports(name, sent))
        elif asked == "file_containing_symbol":
            symbol = request.file_containing_symbol.lstrip(".")
            if symbol not in d.symbols:
                return self._error(response, grpc.StatusCode.NOT_FOUND, f"no symbol named '{symbol}'")
            response.file_descriptor_response.file_descriptor_proto.extend(d.with_imports(d.symbols[symbol], sent))
        elif asked == "file_containing_extension":
            extension = request.file_containing_extension
            key = (extension.containing_type.lstrip("."), extension.extension_number)
            if key not in d.extensions:
                return self._error(response, grpc.StatusCode.NOT_FOUND,
                                   f"no extension {key[1]} of '{key[0]}'")
            response.file_descriptor_response.file_descriptor_proto.extend(d.with_imports(d.extensions[key], sent))
        elif asked == "all_extension_numbers_of_type":
            message = request.all_extension_numbers_of_type.lstrip(".")
            if message not in d.messages:
                return self._error(response, grpc.StatusCode.NOT_FOUND, f"no message type named '{message}'")
            response.all_extension_numbers_response.base_type_name = message
            response.all_extension_numbers_response.extension_number.extend(d.extension_numbers(message))
        else:
            self._error(response, grpc.StatusCode.INVALID_ARGUMENT,
                        "the request asks nothing: set one of its message_request fields")
        return None

    @staticmethod
    def _error(response: Any, code: grpc.StatusCode, message: str) -> None:
        response.error_response.error_code = code.value[0]
        response.error_response.error_message = message

    def _behaviour(self, service: str) -> Any:
        protocol = self._protocols[service]

        async def info(requests: AsyncIterator[Any], _context: Context) -> AsyncIterator[Any]:
            # Lookups in dictionaries built at start-up: nothing here blocks the event loop.
            sent: set[str] = set()
            async for request in requests:
                response = protocol.response()
                self.answer(request, response, sent)
                yield response

        return grpc.stream_stream_rpc_method_handler(
            info, request_deserializer=protocol.request.FromString,
            response_serializer=protocol.response.SerializeToString)

    def add_to(self, server: grpc.aio.Server) -> None:
        """Serve both protocols on `server`."""
        for service in SERVICE_NAMES:
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(service, {_METHOD: self._behaviour(service)}),))
