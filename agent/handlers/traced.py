"""The span of a handler's work: a database statement, a file operation, an upstream HTTP call.

`traced` wraps the chunks a handler yields in a child span of the request's (`tunnel.tracing`), of
kind CLIENT (the agent calls the database, the file system, the app), marked failed with the
request's status and reason when it raises. With tracing off it returns the handler's chunks as
they are: no span, no extra generator, nothing per chunk.

Spans name what ran, never what it carried: no SQL text, paths, URLs' queries or bodies (the same
rule as the audit), since a span leaves the site for whatever collector it is exported to.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping

from opentelemetry.trace import INVALID_SPAN, Span, SpanKind

from onprem.tunnel import tracing
from onprem.tunnel.errors import RequestError
from onprem.v1 import tunnel_pb2

Chunks = AsyncIterator[tunnel_pb2.ResponseChunk]


def traced(name: str, attributes: Callable[[], Mapping[str, str | int | bool]],
           work: Callable[[Span], Chunks]) -> Chunks:
    """`work(span)`'s chunks, inside a span named `name` when spans are made (`attributes()` then)."""
    if not tracing.tracing().enabled:
        return work(INVALID_SPAN)
    return _spanned(name, attributes(), work)


async def _spanned(name: str, attributes: Mapping[str, str | int | bool], work: Callable[[Span], Chunks]) -> Chunks:
    with tracing.span(name, kind=SpanKind.CLIENT, attributes=attributes) as span:
        try:
            async for chunk in work(span):
                yield chunk
        except RequestError as exc:
            tracing.failed(span, exc.code.name, exc.reason)
            raise
