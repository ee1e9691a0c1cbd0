"""Server reflection (`api.reflection`), v1 and v1alpha, asked by a Python client on an in-process server.

Each test asks its questions on one stream, as grpcurl and buf curl do, and reads the answers in order.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

import onprem.v1
from onprem.control_plane.api.reflection import V1, V1ALPHA, Descriptors, Reflection, load_descriptor_set

SERVICES = ["onprem.v1.DatabaseService", "grpc.health.v1.Health"]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def v1_classes() -> tuple[type[Any], type[Any]]:
    pool = DescriptorPool()
    [v1] = [f for f in load_descriptor_set().file if f.package == "grpc.reflection.v1"]
    pool.Add(v1)
    return (message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionRequest")),
            message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse")))


PROTOCOLS = {V1: v1_classes(), V1ALPHA: (v1alpha_pb2.ServerReflectionRequest, v1alpha_pb2.ServerReflectionResponse)}


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server()
    Reflection(SERVICES, modules=[health_pb2.DESCRIPTOR]).add_to(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield ch
    finally:
        await server.stop(0)


async def ask(channel: grpc.aio.Channel, service: str, questions: Sequence[dict[str, Any]]) -> list[Any]:
    """Send every question on one stream; the answers, in order."""
    request_class, response_class = PROTOCOLS[service]
    call: Any = channel.stream_stream(f"/{service}/ServerReflectionInfo",
                                      request_serializer=request_class.SerializeToString,
                                      response_deserializer=response_class.FromString)
    stream = call()
    answers = []
    for question in questions:
        await stream.write(request_class(**question))
        answers.append(await stream.read())
    await stream.done_writing()
    assert await stream.code() == grpc.StatusCode.OK
    return answers


def files(answer: Any) -> list[descriptor_pb2.FileDescriptorProto]:
    assert answer.WhichOneof("message_response") == "file_descriptor_response", answer
    return [descriptor_pb2.FileDescriptorProto.FromString(b) for b in answer.file_descriptor_response.file_descriptor_proto]


def comments(file: descriptor_pb2.FileDescriptorProto) -> str:
    return "".join(loc.leading_comments for loc in file.source_code_info.location)


both = pytest.mark.parametrize("service", [V1, V1ALPHA])


@both
async def test_list_services_names_the_servers_services_and_both_reflection_protocols(
        channel: grpc.aio.Channel, service: str) -> None:
    [answer] = await ask(channel, service, [{"list_services": ""}])
    assert [s.name for s in answer.list_services_response.service] == [
        "grpc.health.v1.Health", V1, V1ALPHA, "onprem.v1.DatabaseService"]
    assert answer.original_request.list_services == ""


@both
async def test_a_symbols_file_comes_with_its_comments_and_then_its_imports(channel: grpc.aio.Channel, service: str) -> None:
    [answer] = await ask(channel, service, [{"file_containing_symbol": "onprem.v1.QueryRequest", "host": "cp"}])
    sent = files(answer)
    assert [f.name for f in sent] == ["onprem/v1/database.proto", "onprem/v1/values.proto"]
    assert "The SQL text: exactly one statement." in comments(sent[0])
    assert answer.valid_host == "cp"
    assert answer.original_request.file_containing_symbol == "onprem.v1.QueryRequest"


@pytest.mark.parametrize("symbol", ["onprem.v1.QueryRequest.sql", "onprem.v1.DatabaseService.Query",
                                    "onprem.v1.VALUE_TYPE_INT64", ".onprem.v1.DatabaseService"])
async def test_fields_methods_and_enum_values_are_symbols_too(channel: grpc.aio.Channel, symbol: str) -> None:
    [answer] = await ask(channel, V1, [{"file_containing_symbol": symbol}])
    assert files(answer)[0].name in ("onprem/v1/database.proto", "onprem/v1/values.proto")


@both
async def test_an_unknown_symbol_is_not_found_and_the_stream_goes_on(channel: grpc.aio.Channel, service: str) -> None:
    missing, found = await ask(channel, service, [{"file_containing_symbol": "onprem.v1.Nope"},
                                                  {"file_containing_symbol": "onprem.v1.QueryRequest"}])
    assert missing.WhichOneof("message_response") == "error_response"
    assert (missing.error_response.error_code, missing.error_response.error_message) == (
        NOT_FOUND, "no symbol named 'onprem.v1.Nope'")
    assert files(found)[0].name == "onprem/v1/database.proto"


@both
async def test_an_unknown_file_extension_or_type_is_not_found(channel: grpc.aio.Channel, service: str) -> None:
    answers = await ask(channel, service, [
        {"file_by_filename": "onprem/v1/nope.proto"},
        {"file_containing_extension": {"containing_type": "onprem.v1.QueryRequest", "extension_number": 100}},
        {"all_extension_numbers_of_type": "onprem.v1.Nope"},
        {"all_extension_numbers_of_type": "onprem.v1.QueryRequest.sql"},  # a field, not a message
    ])
    assert [(a.error_response.error_code, a.error_response.error_message) for a in answers] == [
        (NOT_FOUND, "no file named 'onprem/v1/nope.proto'"),
        (NOT_FOUND, "no extension 100 of 'onprem.v1.QueryRequest'"),
        (NOT_FOUND, "no message type named 'onprem.v1.Nope'"),
        (NOT_FOUND, "no message type named 'onprem.v1.QueryRequest.sql'"),
    ]


async def test_a_question_that_asks_nothing_is_invalid(channel: grpc.aio.Channel) -> None:
    [answer] = await ask(channel, V1, [{"host": "cp"}])
    assert answer.error_response.error_code == INVALID_ARGUMENT


async def test_a_message_without_extensions_has_an_empty_list(channel: grpc.aio.Channel) -> None:
    [answer] = await ask(channel, V1, [{"all_extension_numbers_of_type": "onprem.v1.QueryRequest"}])
    assert answer.all_extension_numbers_response.base_type_name == "onprem.v1.QueryRequest"
    assert list(answer.all_extension_numbers_response.extension_number) == []


async def test_imports_are_sent_once_per_stream_and_the_file_asked_for_always(channel: grpc.aio.Channel) -> None:
    first, second, again = await ask(channel, V1, [
        {"file_by_filename": "onprem/v1/agents.proto"},
        {"file_by_filename": "onprem/v1/tokens.proto"},  # imports duration and timestamp, sent already
        {"file_by_filename": "onprem/v1/profiles.proto"},
    ])
    assert [f.name for f in files(first)] == ["onprem/v1/agents.proto", "google/protobuf/duration.proto",
                                              "google/protobuf/timestamp.proto", "onprem/v1/profiles.proto"]
    assert [f.name for f in files(second)] == ["onprem/v1/tokens.proto"]
    assert [f.name for f in files(again)] == ["onprem/v1/profiles.proto"]


async def test_fields_are_served_without_json_names(channel: grpc.aio.Channel) -> None:
    # With them, grpcurl would print lowerCamel names instead of the protos' (agent_id, as the docs show).
    [answer] = await ask(channel, V1, [{"file_containing_symbol": "onprem.v1.Agent"}])
    for file in files(answer):
        for message in file.message_type:
            assert not [f.name for f in message.field if f.HasField("json_name")], message.name


async def test_the_health_service_is_described_from_its_module(channel: grpc.aio.Channel) -> None:
    [answer] = await ask(channel, V1, [{"file_containing_symbol": "grpc.health.v1.Health"}])
    assert [f.name for f in files(answer)] == ["grpc_health/v1/health.proto"]


def test_extensions_are_found_by_their_message_and_number() -> None:
    file = descriptor_pb2.FileDescriptorProto(name="x.proto", package="x", syntax="proto2")
    base = file.message_type.add(name="Base")
    base.extension_range.add(start=100, end=200)
    file.extension.add(name="top", number=101, extendee=".x.Base", type=descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
                       label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    holder = file.message_type.add(name="Holder")
    holder.extension.add(name="inner", number=150, extendee=".x.Base",
                         type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                         label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    descriptors = Descriptors([file])
    assert descriptors.extension_numbers("x.Base") == [101, 150]
    assert descriptors.extensions[("x.Base", 150)] == "x.proto"
    assert {"x.top", "x.Holder.inner"} <= set(descriptors.symbols)


# --- the descriptor set itself --------------------------------------------------------------------------------


def _clear_json_names(messages: Any) -> None:
    # protoc fills json_name into descriptor sets, not into the descriptors it compiles into code.
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _clear_json_names(message.nested_type)


def test_the_descriptor_set_describes_the_generated_code_with_comments_added() -> None:
    # What reflection serves is what the generated code was made from (make check-generated keeps both fresh).
    served = {f.name: f for f in load_descriptor_set().file}
    for info in pkgutil.iter_modules(onprem.v1.__path__):
        if not info.name.endswith("_pb2"):
            continue
        generated = descriptor_pb2.FileDescriptorProto()
        importlib.import_module(f"onprem.v1.{info.name}").DESCRIPTOR.CopyToProto(generated)
        mine = descriptor_pb2.FileDescriptorProto()
        mine.CopyFrom(served[generated.name])
        assert mine.source_code_info.location, f"{generated.name} has no comments in the set"
        mine.ClearField("source_code_info")
        _clear_json_names(mine.message_type)
        assert mine == generated, generated.name


def _shape(file: descriptor_pb2.FileDescriptorProto) -> list[tuple[str, list[tuple[Any, ...]]]]:
    def type_name(name: str) -> str:
        return name.rsplit(".", 1)[-1]

    return [(m.name, [(f.name, f.number, f.type, f.label, type_name(f.type_name), f.oneof_index) for f in m.field])
            for m in file.message_type]


def test_v1_and_v1alpha_are_the_same_messages_on_the_wire() -> None:
    [v1] = [f for f in load_descriptor_set().file if f.package == "grpc.reflection.v1"]
    v1alpha = descriptor_pb2.FileDescriptorProto()
    v1alpha_pb2.DESCRIPTOR.CopyToProto(v1alpha)
    assert _shape(v1) == _shape(v1alpha)
    assert [(m.name, m.client_streaming, m.server_streaming) for m in v1.service[0].method] == [
        ("ServerReflectionInfo", True, True)]
