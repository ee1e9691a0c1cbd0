"""An enrolled agent that does not follow the protocol: raw frames on a real stream.

Tests and benchmarks use it to attack a real control plane with a real
identity (a certificate our CA signed), the way a compromised agent host
could: floods, over-full batches, credit games, lies about request ids and
statuses, and a stream it never reads.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from onprem.agent.identity import Identity, load_identity
from onprem.tunnel.aio import EOF
from onprem.v1 import profiles_pb2, tunnel_pb2, tunnel_pb2_grpc

AgentFrame = tunnel_pb2.ConnectRequest


def hello(*profiles: profiles_pb2.Profile, max_in_flight: int = 8, batching: bool = True) -> tunnel_pb2.Hello:
    return tunnel_pb2.Hello(
        protocol_revisions=[1], agent_version="hostile", hostname="mallory", profiles=list(profiles),
        max_in_flight=max_in_flight, request_window_bytes=4 * 1024 * 1024,
        capabilities=["frame-batch"] if batching else [],
    )


def pings(count: int, start: int = 0) -> AgentFrame:
    """One message holding `count` pings."""
    return AgentFrame(batch=tunnel_pb2.AgentFrameBatch(
        frames=[AgentFrame(ping=tunnel_pb2.Ping(nonce=start + i)) for i in range(count)]))


@dataclass
class Stream:
    """One raw Connect call."""

    call: grpc.aio.StreamStreamCall[AgentFrame, tunnel_pb2.ConnectResponse]
    welcome: tunnel_pb2.Welcome
    #: The status message the control plane ended the stream with.
    details: str = ""
    #: Frames read (from a batch) and not yet looked at.
    _pending: deque[tunnel_pb2.ConnectResponse] = field(default_factory=deque)

    async def send(self, frame: AgentFrame) -> None:
        await self.call.write(frame)

    async def read(self) -> tunnel_pb2.ConnectResponse | None:
        """The next frame from the control plane; None once it ended the stream."""
        frame = await self.call.read()
        if frame is EOF:
            return None
        assert isinstance(frame, tunnel_pb2.ConnectResponse)
        return frame

    async def next_start(self) -> tuple[int, tunnel_pb2.RequestStart]:
        """Read until a request arrives, answering pings so the stream looks alive."""
        while True:
            while self._pending:
                inner = self._pending.popleft()
                if inner.HasField("start"):
                    return inner.request_id, inner.start
                if inner.HasField("ping"):
                    await self.send(AgentFrame(pong=tunnel_pb2.Pong(nonce=inner.ping.nonce)))
            frame = await self.read()
            if frame is None:
                raise ConnectionError("the control plane ended the stream")
            self._pending.extend(frame.batch.frames if frame.HasField("batch") else [frame])

    async def ended(self) -> grpc.StatusCode:
        """Read until the control plane ends the stream; its status code (`details` says why)."""
        try:
            while await self.read() is not None:
                pass
        except grpc.aio.AioRpcError as exc:
            self.details = exc.details() or ""
            return exc.code()
        self.details = await self.call.details() or ""
        return await self.call.code()

    async def flood(self, frames: Iterable[AgentFrame]) -> grpc.StatusCode:
        """Send frames as fast as the stream takes them, until the control plane ends it."""
        try:
            for frame in frames:
                await self.send(frame)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            # A write that races the end of the call fails with a status of the client's own making
            # (INTERNAL); the status the control plane sent is the call's.
            pass
        return await self.ended()


class HostileAgent:
    def __init__(self, identity_dir: Path, ca_file: Path, address: str) -> None:
        self.identity: Identity = load_identity(identity_dir)
        self._ca = ca_file.read_bytes()
        self._address = address

    @asynccontextmanager
    async def channel(self, *, small_window: bool = False) -> AsyncIterator[grpc.aio.Channel]:
        """A channel with our identity; with `small_window`, one that lets little reach it unread
        (no bandwidth probe: 64 KiB per stream), as an agent that wants writes to back up would."""
        creds = grpc.ssl_channel_credentials(
            root_certificates=self._ca, private_key=self.identity.key_pem, certificate_chain=self.identity.cert_pem)
        options: list[tuple[str, int]] = [("grpc.max_send_message_length", 64 * 1024 * 1024),
                                          ("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        if small_window:
            options += [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 64 * 1024)]
        async with grpc.aio.secure_channel(self._address, creds, options=options) as channel:
            yield channel

    @asynccontextmanager
    async def stream(self, channel: grpc.aio.Channel, first: tunnel_pb2.Hello | None = None) -> AsyncIterator[Stream]:
        """A Connect call past the handshake."""
        call = tunnel_pb2_grpc.AgentTunnelStub(channel).Connect()  # type: ignore[call-arg]
        try:
            await call.write(AgentFrame(hello=first or hello()))
            frame = await call.read()
            if frame is EOF:
                raise ConnectionError("no welcome")
            assert isinstance(frame, tunnel_pb2.ConnectResponse) and frame.HasField("welcome"), frame
            yield Stream(call, frame.welcome)
        finally:
            call.cancel()


async def attack(agent: HostileAgent, seconds: float) -> dict[str, int]:
    """Over and over for `seconds`: an over-full batch, a ping flood, a status flood, a reconnect storm.

    Every message is built once, before the clock starts, so the attacker spends its time sending.
    Returns how many streams each attack opened (or had refused).
    """
    loop = asyncio.get_running_loop()
    over_full, flood = pings(300_000), pings(1000)
    status = AgentFrame(status=tunnel_pb2.AgentStatus(profiles_changed=True, profiles=[
        profiles_pb2.Profile(kind=profiles_pb2.PROFILE_KIND_DATABASE, name=f"p{i}") for i in range(200)]))
    statuses = AgentFrame(batch=tunnel_pb2.AgentFrameBatch(frames=[status] * 40))
    counts = {"over-full batch": 0, "ping flood": 0, "status flood": 0, "refused": 0}
    until = loop.time() + seconds
    async with agent.channel() as channel:
        while loop.time() < until:
            for name, message in (("over-full batch", over_full), ("ping flood", flood),
                                  ("status flood", statuses)):
                try:
                    async with agent.stream(channel) as stream:
                        await stream.flood([message])
                    counts[name] += 1
                except (grpc.aio.AioRpcError, ConnectionError):
                    counts["refused"] += 1  # the reconnect budget: try again at once, as an attacker would
    return counts


def main(argv: list[str]) -> int:
    """python -m tools.hostile_agent IDENTITY_DIR CA_FILE ADDRESS SECONDS: attack, then print the counts."""
    identity_dir, ca_file, address, seconds = argv
    counts = asyncio.run(attack(HostileAgent(Path(identity_dir), Path(ca_file), address), float(seconds)))
    print(" ".join(f"{name}={n}" for name, n in counts.items()), flush=True)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
