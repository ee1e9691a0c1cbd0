"""Every operator RPC is refused from its metadata alone: a caller without a valid token cannot hold a call open.

The RPCs come from the generated descriptors (every service of package onprem.v1 whose name ends in "Service",
the operator-facing ones by the protos' own convention), so an RPC added later is covered without editing this
file. Each call sends metadata and never a message: the control plane must answer UNAUTHENTICATED without
waiting for one. A deadline bounds each call only so that a control plane that does wait fails the test
(with DEADLINE_EXCEEDED) instead of hanging it; no assertion is about time.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import ServiceDescriptor
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import onprem.v1
from tools.cluster import ControlPlaneProcess, operator_channel

MISSING = "missing or malformed credentials: send the metadata 'authorization: Bearer <token>'"
BAD = "the bearer token is not valid (unknown, revoked or mistyped)"
UNKNOWN_TOKEN = "onp_0123456789abcdef_" + "x" * 43
#: Long enough never to end a call that the control plane answers at once.
DEADLINE = 15.0


def operator_services() -> list[ServiceDescriptor]:
    services = []
    for info in pkgutil.iter_modules(onprem.v1.__path__):
        if info.name.endswith("_pb2"):
            module = importlib.import_module(f"onprem.v1.{info.name}")
            services += [s for s in module.DESCRIPTOR.services_by_name.values() if s.name.endswith("Service")]
    return sorted(services, key=lambda s: s.full_name)


METHODS = [f"/{service.full_name}/{method.name}" for service in operator_services() for method in service.methods]
CREDENTIALS: dict[str, tuple[tuple[tuple[str, str], ...], str, str]] = {
    "no-metadata": ((), MISSING, "MISSING_TOKEN"),
    "another-scheme": ((("authorization", f"Basic {UNKNOWN_TOKEN}"),), MISSING, "MISSING_TOKEN"),
    "unknown-token": ((("authorization", f"Bearer {UNKNOWN_TOKEN}"),), BAD, "BAD_TOKEN"),
    "garbage-token": ((("authorization", "Bearer not-a-token"),), BAD, "BAD_TOKEN"),
}


def raw_call(channel: grpc.aio.Channel, method: str, metadata: tuple[tuple[str, str], ...]
             ) -> grpc.aio.StreamStreamCall[bytes, bytes]:
    """A call of any method, unary or not, that has sent its metadata and will never send a message."""
    # Raw bytes: no serializers are needed, since nothing is ever sent or (on success) received.
    multicallable: Any = channel.stream_stream(method)  # type: ignore[call-arg]
    call: grpc.aio.StreamStreamCall[bytes, bytes] = multicallable(metadata=metadata, timeout=DEADLINE)
    return call


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneProcess]:
    process = ControlPlaneProcess(tmp_path_factory.mktemp("auth-first") / "cp")
    process.start()
    yield process
    process.stop()


def test_the_descriptors_name_the_operator_services() -> None:
    names = {s.name for s in operator_services()}
    assert {"AgentService", "AppService", "DatabaseService", "FileService"} <= names
    assert "Enrollment" not in names and "AgentTunnel" not in names  # agent-facing, not bearer-token services
    assert len(METHODS) >= 20


async def test_the_control_plane_serves_every_operator_service(cp: ControlPlaneProcess) -> None:
    # Otherwise a service missing from the server would "pass" below with UNIMPLEMENTED... which it would not,
    # but the failure would point at the wrong thing.
    async with operator_channel(cp) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        served = {s.name async for r in responses for s in r.list_services_response.service}
    assert {s.full_name for s in operator_services()} <= served


@pytest.mark.parametrize("credentials", list(CREDENTIALS))
@pytest.mark.parametrize("method", METHODS)
async def test_a_call_without_a_valid_token_is_unauthenticated_before_it_sends_a_message(
    cp: ControlPlaneProcess, method: str, credentials: str
) -> None:
    metadata, message, _reason = CREDENTIALS[credentials]
    assert isinstance(metadata, tuple)
    async with operator_channel(cp) as channel:
        # A raw stream call: it can open any method, unary or not, and send nothing at all.
        call = raw_call(channel, method, metadata)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, message)


async def test_the_refusal_carries_its_reason_for_programs(cp: ControlPlaneProcess) -> None:
    from google.rpc import error_details_pb2, status_pb2

    async with operator_channel(cp) as channel:
        call = raw_call(channel, "/onprem.v1.FileService/Write", CREDENTIALS["unknown-token"][0])
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
    trailers: dict[str, Any] = dict(info.value.trailing_metadata() or ())  # type: ignore[arg-type]
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    detail = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(detail)
    assert (detail.reason, detail.domain) == ("BAD_TOKEN", "onprem.dev")


async def test_the_health_check_needs_no_token(cp: ControlPlaneProcess) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with operator_channel(cp) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE)
    assert response.status == health_pb2.HealthCheckResponse.SERVING
