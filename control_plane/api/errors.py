"""The one place where operator-API exceptions become gRPC statuses.

Servicer methods raise `tunnel.errors.RequestError` subclasses (their own, the
store's refusals from `control_plane.store.errors`, or an agent's, re-raised from
its final status), and they pass through untranslated. The boundary aborts the call
with the error's code and message, and attaches a `google.rpc.Status` with an
`ErrorInfo` (reason, domain) in `grpc-status-details-bin`, so that clients in
any language can branch on a stable reason instead of message text; an
`InvalidArgument` that names its `field` adds a `BadRequest` with that field's
violation, so that a client can point at the input to fix. Any
other exception is a bug: it is logged with its traceback and the caller gets
INTERNAL with no internals.

The error is also noted on the call's observation (`observe.current()`), which
turns it into the call's audit row.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from onprem.control_plane import observe
from onprem.tunnel.errors import Internal, InvalidArgument, RequestError

log = logging.getLogger("onprem.control_plane.api")

ERROR_DOMAIN = "onprem.dev"

Req = TypeVar("Req")
Resp = TypeVar("Resp")


def rich_status(error: RequestError) -> status_pb2.Status:
    """The `google.rpc.Status` a client finds in `grpc-status-details-bin`."""
    status = status_pb2.Status(code=int(error.code), message=error.message)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN))
    if isinstance(error, InvalidArgument) and error.field:
        violation = error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.message)
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    return status


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: RequestError) -> None:
    observation = observe.current()
    if observation is not None and observation.outcome is None:
        observation.outcome = error
    # The call's code and message are taken from the rich status itself, so the two always agree
    # (grpcio-status's `from_call` on the client refuses a status that disagrees with its call).
    status = rpc_status.to_status(rich_status(error))
    await context.abort(status.code, status.details, status.trailing_metadata)


def _internal(method: str) -> RequestError:
    log.exception("%s failed", method)
    return Internal("internal error in the control plane; its log has the details", reason="INTERNAL")


def unary(
    fn: Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext[Req, Resp]) -> Resp:
        try:
            return await fn(self, request, context)
        except RequestError as exc:
            await abort(context, exc)
        except grpc.aio.AbortError:
            raise
        except Exception:
            await abort(context, _internal(fn.__name__))
        raise AssertionError("unreachable: abort raises")

    return wrapper


def streaming(
    fn: Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], AsyncIterator[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], AsyncIterator[Resp]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext[Req, Resp]) -> AsyncIterator[Resp]:
        try:
            async for item in fn(self, request, context):
                yield item
        except RequestError as exc:
            await abort(context, exc)
        except grpc.aio.AbortError:
            raise
        except Exception:
            await abort(context, _internal(fn.__name__))

    return wrapper
