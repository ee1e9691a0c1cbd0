"""The one table from httpx failures to gRPC statuses, with messages that say what failed.

An operator looking at UNAVAILABLE needs to know whether to fix DNS, a
firewall or a certificate, so connection failures are told apart by the
exception that caused them (httpx keeps the chain: socket.gaierror,
ConnectionRefusedError, ssl.SSLError...).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import h11
import httpx

from onprem.agent.profiles.apps import AppProfile
from onprem.tunnel.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    RequestError,
    Unavailable,
)

__all__ = ["Failure", "Progress", "classify", "http_errors", "to_request_error"]


@dataclass
class Progress:
    """How much of the response has gone to the caller."""

    head_sent: bool = False
    body_bytes: int = 0


@dataclass(frozen=True)
class Failure:
    """What went wrong on the way to the app: `stage` is "DNS", "connect", "TLS" or "connection"."""

    stage: str
    detail: str
    #: The TLS layer is the likely culprit although no TLS error was seen (see `classify`).
    tls_suspected: bool = False


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _tls_detail(error: ssl.SSLError) -> str:
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"the app's certificate is not trusted ({error.verify_message}); set ca_file to the app's CA"
    reason = (error.reason or "").upper()
    if "CERTIFICATE_REQUIRED" in reason:
        return "the app requires a client certificate and the agent sent none; set client_cert_file"
    if "ALERT" in reason and any(word in reason for word in ("CERTIFICATE", "UNKNOWN_CA", "DECRYPT", "ACCESS_DENIED")):
        return f"the app refused the agent's client certificate ({error.reason})"
    if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason:
        return "the app did not answer with TLS; is base_url https:// on a plain-HTTP port?"
    return f"handshake failed ({error.reason or error})"


def classify(exc: BaseException, profile: AppProfile, *, before_response: bool = True) -> Failure | None:
    """The stage a connection-level failure happened at, or None when it is not one."""
    url = httpx.URL(profile.base_url)
    host = url.host
    causes = list(_causes(exc))
    for cause in causes:
        if isinstance(cause, socket.gaierror):
            return Failure("DNS", f"cannot resolve {host!r} ({cause.strerror or cause})")
        if isinstance(cause, ssl.SSLError):
            return Failure("TLS", _tls_detail(cause))
        if isinstance(cause, ConnectionRefusedError):
            return Failure("connect", f"connection refused by {_authority(profile)}")
        if isinstance(cause, httpx.ConnectTimeout):
            return Failure("connect", f"no answer from {_authority(profile)} within "
                                      f"{profile.connect_timeout_seconds:g} s (connect_timeout_seconds)")
    if isinstance(exc, httpx.ConnectError):
        return Failure("connect", f"cannot connect to {_authority(profile)} ({exc or type(exc).__name__})")
    hung_up = isinstance(exc, httpx.RemoteProtocolError) or any(
        isinstance(c, BrokenPipeError | ConnectionResetError | ConnectionAbortedError) for c in causes)
    if url.scheme == "https" and before_response and hung_up:
        # With TLS 1.3 the server judges the client certificate after the client's handshake is done; its
        # alert often loses the race with the reset of the connection, and then no TLS error is seen at all.
        return Failure("connection", "the app closed the connection right after the TLS handshake, without "
                       "answering; that is how an app refusing (or requiring) a client certificate usually "
                       "shows it: check client_cert_file and the CA the app trusts", tls_suspected=True)
    return None


def _authority(profile: AppProfile) -> str:
    url = httpx.URL(profile.base_url)
    return f"{url.host}:{url.port or (443 if url.scheme == 'https' else 80)}"


def to_request_error(exc: Exception, profile: AppProfile, progress: Progress | None = None) -> RequestError:
    """The RequestError for an httpx failure, naming the profile and what failed.

    A connection that fails after the response head went to the caller is
    reported as a cut-off response (UNAVAILABLE, APP_RESPONSE_INCOMPLETE), so
    the caller's stream ends in an error, never in a truncated success.
    """
    where = f"app profile '{profile.name}' ({profile.base_url})"
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
        # Nothing was sent: the app is unreachable, which another agent of the group might not be.
        timed_out = classify(exc, profile) or Failure("connect", "timed out waiting for a connection")
        return Unavailable(f"{where}: {timed_out.stage}: {timed_out.detail}", reason="APP_UNREACHABLE")
    if isinstance(exc, httpx.TimeoutException):
        what = "reading from" if isinstance(exc, httpx.ReadTimeout) else "sending to"
        return DeadlineExceeded(f"{where}: the app was silent for {profile.read_timeout_seconds:g} s while the "
                                f"agent was {what} it (read_timeout_seconds)", reason="APP_TIMEOUT")
    if isinstance(exc, httpx.LocalProtocolError | h11.LocalProtocolError):
        # h11 (sometimes unwrapped by httpcore) refuses to send what it was given, e.g. a body longer or shorter than Content-Length.
        return InvalidArgument(f"{where}: the request is not valid HTTP: {exc}", reason="INVALID_REQUEST")
    # Raw OSErrors count too: httpcore lets an ssl.SSLError raised while reading (e.g. the TLS 1.3
    # alert of a refused client certificate, which arrives after the handshake) escape unwrapped.
    if isinstance(exc, httpx.ConnectError | httpx.ReadError | httpx.WriteError | httpx.RemoteProtocolError | OSError):
        head_sent = progress is not None and progress.head_sent
        failure = classify(exc, profile, before_response=not head_sent)
        if progress is not None and progress.head_sent:
            why = f"{failure.stage}: {failure.detail}" if failure else str(exc) or type(exc).__name__
            return Unavailable(f"{where}: the response was cut off after {progress.body_bytes} body bytes "
                               f"({why}); what arrived is incomplete", reason="APP_RESPONSE_INCOMPLETE")
        if failure is not None:
            return Unavailable(f"{where}: {failure.stage}: {failure.detail}", reason="APP_UNREACHABLE")
        return Unavailable(f"{where}: the connection failed: {exc or type(exc).__name__}",
                           reason="APP_CONNECTION_FAILED")
    if isinstance(exc, httpx.InvalidURL | httpx.UnsupportedProtocol):
        return InvalidArgument(f"{where}: {exc}", reason="INVALID_URL")
    return Internal(f"{where}: {type(exc).__name__}: {exc}", reason="APP_ERROR")


@contextmanager
def http_errors(profile: AppProfile, progress: Progress | None = None) -> Iterator[None]:
    """Turn httpx errors raised in the block into RequestErrors (see `to_request_error`)."""
    try:
        yield
    except RequestError:
        raise
    except (httpx.HTTPError, h11.LocalProtocolError, OSError) as exc:
        raise to_request_error(exc, profile, progress) from None
