"""App calls end to end: an operator on AppService/Call, a real control plane
and agent process, and a real HTTP app in a third process.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from onprem.v1 import agents_pb2, apps_pb2, apps_pb2_grpc
from tests.support.apps_upstream import PATTERN, UpstreamProcess
from tools.cluster import AgentProcess, ControlPlaneProcess, bearer, operator_channel, wait_for_agent_state

GROUP = "e2e-apps"
KEY = "e2e-app-key-51c9"
MIB = 1024 * 1024
SIZE = 200 * MIB


def vm_hwm_kib(pid: int) -> int:
    """Peak resident memory of the process since it started."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


class App(UpstreamProcess):
    """The HTTP app, in its own process, steerable: like a misconfigured framework it honours method
    overrides, rewritten URLs and forwarded identities, so that what the agent lets through really
    changes what it runs. Calls without such headers are served exactly as by a plain app.
    """

    def __init__(self) -> None:
        super().__init__(steerable=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ControlPlaneProcess, AgentProcess, str, App]]:
    base = tmp_path_factory.mktemp("e2e-apps")
    app = App()
    cp = ControlPlaneProcess(base / "cp")
    cp.start()
    token = cp.admin_token()
    agent = AgentProcess(base / "agent", cp, profiles={"apps": {
        "app": {"base_url": app.base_url, "headers_from_env": {"X-Api-Key": "E2E_APP_KEY"}},
        "narrow": {"base_url": app.base_url, "methods": ["GET"], "path_prefixes": ["orders"]},
        "public": {"base_url": app.base_url, "methods": ["GET"], "path_prefixes": ["public"]},
        "public-forwarded": {"base_url": app.base_url, "methods": ["GET"], "path_prefixes": ["public"],
                             "allow_caller_headers": ["X-Forwarded-For"]},
    }}, env={"E2E_APP_KEY": KEY})
    agent.enroll(GROUP)
    agent.start()

    async def ready() -> None:
        async with operator_channel(cp) as channel:
            await wait_for_agent_state(channel, token, agent.agent_id, agents_pb2.AGENT_STATE_ACTIVE)

    asyncio.run(ready())
    yield cp, agent, token, app
    agent.stop()
    cp.stop()
    app.stop()


def head(path: str, method: str = "GET", profile: str = "app", query: dict[str, str] | None = None,
         headers: dict[str, str] | None = None) -> apps_pb2.CallRequest:
    return apps_pb2.CallRequest(head=apps_pb2.CallHead(
        group=GROUP, profile=profile, method=method, path=path,
        query=[apps_pb2.QueryParameter(name=k, value=v) for k, v in (query or {}).items()],
        headers=[apps_pb2.Header(name=k, value=v) for k, v in (headers or {}).items()]))


async def only(first: apps_pb2.CallRequest) -> AsyncIterator[apps_pb2.CallRequest]:
    yield first


async def call(channel: grpc.aio.Channel, token: str, request: apps_pb2.CallRequest,
               deadline_seconds: float = 30) -> tuple[apps_pb2.CallResponseHead, bytes]:
    stub = apps_pb2_grpc.AppServiceStub(channel)
    responses = [r async for r in stub.Call(only(request), metadata=bearer(token), timeout=deadline_seconds)]
    return responses[0].head, b"".join(r.body for r in responses[1:])


async def test_200_mb_go_up_and_come_down_through_the_tunnel_in_flat_memory(
    cluster: tuple[ControlPlaneProcess, AgentProcess, str, App],
) -> None:
    cp, agent, token, _ = cluster
    assert agent.proc is not None and cp.proc is not None
    async with operator_channel(cp) as channel:
        stub = apps_pb2_grpc.AppServiceStub(channel)
        await call(channel, token, head("warm-up"))  # pools, clients and buffers exist before the baseline
        before = vm_hwm_kib(agent.proc.pid), vm_hwm_kib(cp.proc.pid)
        began = time.monotonic()

        sent = hashlib.sha256()

        async def upload() -> AsyncIterator[apps_pb2.CallRequest]:
            yield head("sink", method="PUT", headers={"Content-Type": "application/octet-stream"})
            piece = PATTERN * 4  # 256 KiB
            for _ in range(SIZE // len(piece)):
                sent.update(piece)
                yield apps_pb2.CallRequest(body=piece)

        responses = [r async for r in stub.Call(upload(), metadata=bearer(token), timeout=120)]
        assert responses[0].head.status_code == 200
        assert json.loads(b"".join(r.body for r in responses[1:])) == {"bytes": SIZE, "sha256": sent.hexdigest()}
        up = time.monotonic() - began

        began, received, digest, expected = time.monotonic(), 0, hashlib.sha256(), hashlib.sha256()
        async for response in stub.Call(only(head("bytes", query={"n": str(SIZE)})), metadata=bearer(token),
                                        timeout=120):
            if response.HasField("body"):
                received += len(response.body)
                digest.update(response.body)
        for _ in range(SIZE // len(PATTERN)):
            expected.update(PATTERN)
        down = time.monotonic() - began
    assert (received, digest.hexdigest()) == (SIZE, expected.hexdigest())
    growth_agent, growth_cp = vm_hwm_kib(agent.proc.pid) - before[0], vm_hwm_kib(cp.proc.pid) - before[1]
    print(f"200 MiB up in {up:.1f} s, down in {down:.1f} s; peak RSS growth: agent {growth_agent} KiB, "
          f"control plane {growth_cp} KiB")
    assert growth_agent < 48 * 1024, f"agent peak RSS grew by {growth_agent} KiB"
    assert growth_cp < 48 * 1024, f"control plane peak RSS grew by {growth_cp} KiB"


async def test_an_app_error_status_is_a_normal_response_and_injected_secrets_stay_hidden(
    cluster: tuple[ControlPlaneProcess, AgentProcess, str, App],
) -> None:
    cp, _, token, _ = cluster
    async with operator_channel(cp) as channel:
        missing, body = await call(channel, token, head("missing"))
        assert (missing.status_code, body) == (404, b"no such thing")
        reflected, _ = await call(channel, token, head("reflect", headers={"X-Trace": "t1"}))
        echoed = {h.name.lower(): h.value for h in reflected.headers}
    assert echoed["x-echo-x-trace"] == "t1"
    assert all(KEY not in value for value in echoed.values())


async def test_an_app_hanging_up_mid_body_ends_the_operators_stream_with_unavailable(
    cluster: tuple[ControlPlaneProcess, AgentProcess, str, App],
) -> None:
    cp, _, token, _ = cluster
    got: list[apps_pb2.CallResponse] = []
    async with operator_channel(cp) as channel:
        stub = apps_pb2_grpc.AppServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for response in stub.Call(only(head("cut")), metadata=bearer(token), timeout=30):
                got.append(response)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "cut off after" in (info.value.details() or "")
    assert got[0].head.status_code == 200  # the head went out; the error, not a short success, ends the stream


async def test_an_operators_cancel_closes_the_apps_connection(
    cluster: tuple[ControlPlaneProcess, AgentProcess, str, App],
) -> None:
    cp, _, token, app = cluster
    async with operator_channel(cp) as channel:
        stub = apps_pb2_grpc.AppServiceStub(channel)
        stream = stub.Call(only(head("forever")), metadata=bearer(token), timeout=60)
        first = await stream.read()
        assert isinstance(first, apps_pb2.CallResponse) and first.HasField("head")
        assert isinstance(await stream.read(), apps_pb2.CallResponse)
        stream.cancel()
        deadline = time.monotonic() + 10
        while not any(e.get("closed_by_client") for e in await asyncio.to_thread(app.events)):
            assert time.monotonic() < deadline, "the app never saw its connection close"
            await asyncio.sleep(0.05)


async def test_an_operators_deadline_on_a_stalled_app_is_deadline_exceeded(
    cluster: tuple[ControlPlaneProcess, AgentProcess, str, App],
) -> None:
    cp, _, token, _ = cluster
    async with operator_channel(cp) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(channel, token, head("stall", query={"seconds": "5"}), deadline_seconds=1)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.parametrize(("request_", "code"), [
    (head("//evil.example/x"), grpc.StatusCode.INVALID_ARGUMENT),
    (head("orders/../admin", profile="narrow"), grpc.StatusCode.INVALID_ARGUMENT),
    (head("admin", profile="narrow"), grpc.StatusCode.PERMISSION_DENIED),
    (head("orders/1", method="DELETE", profile="narrow"), grpc.StatusCode.PERMISSION_DENIED),
    (head("x", headers={"X-Api-Key": "mine"}), grpc.StatusCode.PERMISSION_DENIED),
], ids=["other-host", "dot-dot-out-of-prefix", "outside-prefixes", "method-not-allowed", "injected-header"])
async def test_confinement_holds_through_the_operator_api(
    cluster: tuple[ControlPlaneProcess, AgentProcess, str, App], request_: apps_pb2.CallRequest,
    code: grpc.StatusCode,
) -> None:
    cp, _, token, _ = cluster
    async with operator_channel(cp) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(channel, token, request_)
    assert info.value.code() == code


async def test_a_path_under_an_allowed_prefix_works_through_the_operator_api(
    cluster: tuple[ControlPlaneProcess, AgentProcess, str, App],
) -> None:
    cp, _, token, _ = cluster
    async with operator_channel(cp) as channel:
        response, body = await call(channel, token, head("orders/7", profile="narrow"))
    assert response.status_code == 200
    assert json.loads(body)["path"] == "/api/orders/7"


def reason_of(error: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason in the status details the control plane attaches."""
    trailers: list[tuple[str, bytes]] = list(error.trailing_metadata() or ())  # type: ignore[arg-type]
    status = status_pb2.Status.FromString(dict(trailers)["grpc-status-details-bin"])
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    reason: str = info.reason
    return reason


async def test_an_operator_cannot_turn_a_get_of_public_orders_into_delete_of_an_admin_user(
    cluster: tuple[ControlPlaneProcess, AgentProcess, str, App],
) -> None:
    cp, _, token, app = cluster
    attack = head("public/orders", profile="public", headers={"X-HTTP-Method-Override": "DELETE",
                                                              "X-Original-URL": "/api/admin/users/1"})
    async with operator_channel(cp) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(channel, token, attack)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert info.value.details() == (
        "header 'X-HTTP-Method-Override' would let the caller change the method the app runs; app profile 'public' "
        "does not allow callers to send it (allow_caller_headers)")
    assert reason_of(info.value) == "CALLER_HEADER_NOT_ALLOWED"
    received = await asyncio.to_thread(app.requests)
    assert not any("public/orders" in r["path"] or "admin" in r["path"] for r in received)


async def test_a_header_listed_in_allow_caller_headers_reaches_the_app_through_the_operator_api(
    cluster: tuple[ControlPlaneProcess, AgentProcess, str, App],
) -> None:
    cp, _, token, _ = cluster
    async with operator_channel(cp) as channel:
        response, body = await call(channel, token, head("public/report", profile="public-forwarded",
                                                         headers={"X-Forwarded-For": "10.9.8.7"}))
    assert response.status_code == 200
    assert json.loads(body)["ran"]["client"] == "10.9.8.7"
