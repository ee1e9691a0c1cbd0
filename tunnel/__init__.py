"""The tunnel protocol, written once and used by both ends.

`protocol` holds the per-request state machine and flow control, free of I/O:
frames in, events out. `errors` holds the error hierarchy and its mapping to
gRPC status codes. `shell` is the asyncio shell that moves frames over a
real stream, for either end; each end's session (`agent.session`,
`control_plane.sessions`) plugs into it.
"""
