"""Typed handlers: one subpackage per kind of work (`database`, `folders`, `apps`); `base` says what each implements.

A handler never sees the tunnel. The dispatcher (`agent.dispatcher`) hands it
its kind's typed payload (`DatabaseQuery`, `FileOp`, `AppCall`) and, for
uploads, an async iterator of body bytes; it yields `ResponseChunk` messages
and raises a `tunnel.errors.RequestError` to fail. Each request runs in its
own task in `agent.session`, which owns its deadline, its cancellation and its
flow control.
"""
