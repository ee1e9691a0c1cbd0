"""Typed handlers: one per kind of payload (database, folder, app).

A handler never sees the tunnel. It gets the payload and, for uploads, an
async iterator of body bytes; it yields `ResponseChunk` messages and raises a
`tunnel.errors.RequestError` to fail. The request runner in
`agent.dispatcher` owns deadlines, cancellation and flow control.
"""
