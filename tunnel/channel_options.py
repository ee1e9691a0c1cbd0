"""gRPC channel and server options for the tunnel's long-lived stream.

Transport keepalive notices a dead TCP peer; application heartbeats (in the
protocol) notice a peer that is alive but silent and keep proxies from
closing an idle stream. The server must permit pings as often as the client
sends them, or it answers with GOAWAY "too_many_pings".
"""

from __future__ import annotations

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
#: The largest message an agent may send on its stream: a batch holds at most 1 MiB of payload plus
#: one more chunk of at most 256 KiB, and a Hello at most 1,024 profiles. A smaller limit than the
#: operator's means a hostile agent's message costs little to parse before its budgets refuse it.
MAX_AGENT_MESSAGE_BYTES = 2 * 1024 * 1024

KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000

CLIENT_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Our own loop does the backing off; the channel must not add minutes of its own.
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5_000),
]

SERVER_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

#: How much of one operator stream's upload the transport may hold before our handler reads it. By
#: default gRPC's bandwidth-delay probe grows a stream's window without bound as it sees fast
#: links: an upload waiting for a slow agent then parked 64 MiB per stream in the control plane.
#: A fixed window bounds it; 2 MiB still fills a 40 MB/s link at 50 ms of round trip.
OPERATOR_STREAM_WINDOW_BYTES = 2 * 1024 * 1024

#: The operator listener.
OPERATOR_SERVER_OPTIONS: list[tuple[str, int | str]] = [
    *SERVER_OPTIONS,
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", OPERATOR_STREAM_WINDOW_BYTES),
]

#: The agent listener: what an agent sends is bounded tighter than what an operator sends.
TUNNEL_SERVER_OPTIONS: list[tuple[str, int | str]] = [
    *(option for option in SERVER_OPTIONS if option[0] != "grpc.max_receive_message_length"),
    ("grpc.max_receive_message_length", MAX_AGENT_MESSAGE_BYTES),
]
