"""The baseline of the small-requests benchmark: a bare grpc.aio relay in three processes.

    python -m tools.bench.bare_relay relay --cert C --key K
    python -m tools.bench.bare_relay backend --address 127.0.0.1:PORT --cert C --key K --sqlite DB

The same layout as ours, with nothing but the relaying:

    client ──TLS──► relay ◄══TLS, client certificate══ backend
                    (unary-stream          (dials out, holds ONE bidi stream)
                     /bench.Relay/Call)

* The **relay** listens on a free loopback port (printed on one line), serves
  `/bench.Relay/Call` to clients (a server-streaming RPC, as
  `DatabaseService/Query` is, answered with one message) and `/bench.Relay/Connect`
  to the backend, which must present a certificate (mTLS, as agents do).
  Each call takes the next request id, goes down the backend's one stream
  through a single writer task (grpc.aio allows one outstanding write per
  call), and waits for the answer with that id.
* The **backend** dials the relay, opens the one stream and answers each
  request in its own task by running the request's SQL on SQLite in a pool of
  4 worker threads (the agent's default `pool_size`), one connection per
  thread, so that the baseline does the same database work as the agent.

Frames are an 8-byte request id followed by raw bytes (towards the backend: the
SQL), or (back) by a sequence of parts, each a 4-byte length and its bytes: no
protobuf, no flow control, no deadlines, no audit, no authentication: the
least such a relay can cost. The relay passes each part on to the client as
one message; the backend answers each request with one frame.

`backend --shaped` answers with three parts instead of one (a header, the rows,
a summary), for diagnosis: three messages to the client per request is what
the streamed shape of `DatabaseService/Query` (header, row batches, summary)
costs, whatever the tunnel does. The one certificate given is both the relay's server certificate and the
backend's client certificate, and the trust root of both (it is self-signed).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime as dt
import ipaddress
import sqlite3
import struct
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from onprem.tunnel.aio import EOF

CALL = "/bench.Relay/Call"
CONNECT = "/bench.Relay/Connect"
_ID = struct.Struct(">Q")
_LEN = struct.Struct(">I")


def pack_answer(rid: int, parts: list[bytes]) -> bytes:
    return _ID.pack(rid) + b"".join(_LEN.pack(len(part)) + part for part in parts)


def unpack_answer(frame: bytes) -> tuple[int, list[bytes]]:
    (rid,) = _ID.unpack_from(frame)
    parts: list[bytes] = []
    at = _ID.size
    while at < len(frame):
        (size,) = _LEN.unpack_from(frame, at)
        at += _LEN.size
        parts.append(frame[at:at + size])
        at += size
    return rid, parts
#: The agent's default database pool size, and so its number of worker threads per profile.
POOL = 4


def _identity(data: bytes) -> bytes:
    return data


def make_self_signed(workdir: Path, name: str = "bare") -> tuple[Path, Path]:
    """A self-signed EC certificate for 127.0.0.1 and localhost, usable as CA, server and client certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = workdir / f"{name}.pem", workdir / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


# --- the relay ----------------------------------------------------------------


class _Relay:
    def __init__(self) -> None:
        self._next_id = 0
        self._waiting: dict[int, asyncio.Future[list[bytes]]] = {}
        self._outbound: asyncio.Queue[bytes] | None = None
        self._backend_ready = asyncio.Event()

    async def call(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        outbound = self._outbound
        if outbound is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no backend connected")
            return
        self._next_id += 1
        rid = self._next_id
        answer: asyncio.Future[list[bytes]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = answer
        try:
            outbound.put_nowait(_ID.pack(rid) + request)
            for part in await answer:
                yield part
        finally:
            self._waiting.pop(rid, None)

    async def connect(self, frames: AsyncIterator[bytes],
                      _context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        """The backend's one stream: answers come in on `frames`, requests go out as yielded."""
        outbound: asyncio.Queue[bytes] = asyncio.Queue()
        self._outbound = outbound

        async def read_answers() -> None:
            async for frame in frames:
                rid, parts = unpack_answer(frame)
                waiter = self._waiting.get(rid)
                if waiter is not None and not waiter.done():
                    waiter.set_result(parts)
            outbound.put_nowait(b"")  # the backend went away: end the stream

        reader = asyncio.get_running_loop().create_task(read_answers())
        try:
            while frame := await outbound.get():
                yield frame  # one write at a time: this generator is the stream's only writer
        finally:
            self._outbound = None
            reader.cancel()
            for waiter in self._waiting.values():
                if not waiter.done():
                    waiter.set_exception(RuntimeError("the backend went away"))


async def serve_relay(cert: bytes, key: bytes) -> None:
    relay = _Relay()
    handler = grpc.method_handlers_generic_handler("bench.Relay", {
        "Call": grpc.unary_stream_rpc_method_handler(relay.call, request_deserializer=_identity,
                                                     response_serializer=_identity),
        "Connect": grpc.stream_stream_rpc_method_handler(relay.connect, request_deserializer=_identity,
                                                         response_serializer=_identity),
    })
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=cert, require_client_auth=False)
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


# --- the backend --------------------------------------------------------------


class _Database:
    """SQLite in a fixed pool of worker threads, one connection per thread."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._local = threading.local()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=POOL, thread_name_prefix="bare-db")

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = sqlite3.connect(self._path)
        return conn

    def _run(self, sql: str) -> bytes:
        return repr(self._connection().execute(sql).fetchall()).encode()

    async def run(self, sql: str) -> bytes:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._run, sql)


async def serve_backend(address: str, cert: bytes, key: bytes, sqlite_path: str, *, shaped: bool = False) -> None:
    database = _Database(sqlite_path)
    creds = grpc.ssl_channel_credentials(root_certificates=cert, private_key=key, certificate_chain=cert)
    async with grpc.aio.secure_channel(address, creds) as channel:
        connect = channel.stream_stream(CONNECT, request_serializer=_identity, response_deserializer=_identity)
        call = connect()  # type: ignore[call-arg]  # opened without an iterator: we write()
        outbound: asyncio.Queue[bytes] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        async def answer(frame: bytes) -> None:
            (rid,) = _ID.unpack_from(frame)
            try:
                await answer_one(rid, frame[_ID.size:].decode())
            except Exception as exc:  # say so, and end the request: nothing may hang
                print(f"bare backend: request {rid} failed: {exc!r}", file=sys.stderr, flush=True)
                outbound.put_nowait(pack_answer(rid, []))

        async def answer_one(rid: int, sql: str) -> None:
            rows = await database.run(sql)
            outbound.put_nowait(pack_answer(rid, [b"header", rows, b"summary"] if shaped else [rows]))

        async def write_answers() -> None:
            while True:
                await call.write(await outbound.get())

        writer = asyncio.get_running_loop().create_task(write_answers())
        try:
            while True:
                frame = await call.read()
                if frame is EOF:
                    return
                assert isinstance(frame, bytes)
                task = asyncio.get_running_loop().create_task(answer(frame))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            writer.cancel()
            call.cancel()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.bare_relay")
    parser.add_argument("role", choices=["relay", "backend"])
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--address", help="the relay's host:port (backend only)")
    parser.add_argument("--sqlite", help="the SQLite database file the backend queries (backend only)")
    parser.add_argument("--shaped", action="store_true",
                        help="answer each request with 3 messages to the client, as Query does (backend only)")
    args = parser.parse_args(argv)
    cert, key = Path(args.cert).read_bytes(), Path(args.key).read_bytes()
    if args.role == "relay":
        asyncio.run(serve_relay(cert, key))
    else:
        if not args.address or not args.sqlite:
            parser.error("backend needs --address and --sqlite")
        asyncio.run(serve_backend(args.address, cert, key, args.sqlite, shaped=args.shaped))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
