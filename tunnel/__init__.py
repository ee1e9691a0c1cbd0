"""The tunnel protocol, written once and used by both ends.

`protocol` holds the per-request state machine and flow control, free of I/O:
frames in, events out. `errors` holds the error hierarchy and its mapping to
gRPC status codes. The asyncio shells that move frames over a real stream
live in `agent.tunnel_client` and `control_plane.sessions`.
"""
