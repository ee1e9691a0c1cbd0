"""How `onprem` fails: one line `onprem: <CODE>: <message>` on stderr and an exit code per class of error."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

EXIT_OK = 0
EXIT_ERROR = 1  # an unexpected failure (a bug, or an error of a kind not listed below)
EXIT_USAGE = 2  # bad command line: unknown option, missing token, malformed --param
EXIT_LOCAL = 3  # a local file cannot be read or written, or the destination already exists
EXIT_CHECKSUM = 4  # the bytes do not have the expected SHA-256 (download verified locally, or upload refused)
EXIT_AUTH = 5  # UNAUTHENTICATED, PERMISSION_DENIED: the token is wrong or may not do this
EXIT_NOT_FOUND = 6  # NOT_FOUND: no such group, profile, agent, path
EXIT_REFUSED = 7  # INVALID_ARGUMENT, FAILED_PRECONDITION, ALREADY_EXISTS, OUT_OF_RANGE, RESOURCE_EXHAUSTED
EXIT_UNAVAILABLE = 8  # UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED: nothing reachable now; retrying may help
EXIT_SERVER = 9  # INTERNAL, UNKNOWN, DATA_LOSS, UNIMPLEMENTED, ABORTED: the server failed
EXIT_UNHEALTHY = 10  # `onprem agents check`: the agent ran the checks and one failed
EXIT_HTTP = 11  # `onprem app call --fail`: the app answered with an HTTP status of 400 or more

EXIT_CODES_HELP = f"""\
exit codes:
  {EXIT_OK}  success
  {EXIT_ERROR}  unexpected failure
  {EXIT_USAGE}  bad command line (unknown option, no token, malformed --param)
  {EXIT_LOCAL}  a local file cannot be read or written, or the destination exists (see --force)
  {EXIT_CHECKSUM}  checksum mismatch: the download did not hash to the agent's SHA-256 (the partial
     file is removed), or the agent refused an upload whose bytes did not match expected_sha256
  {EXIT_AUTH}  UNAUTHENTICATED or PERMISSION_DENIED: check the token and the groups it may use
  {EXIT_NOT_FOUND}  NOT_FOUND: no such group, profile, agent or path
  {EXIT_REFUSED}  INVALID_ARGUMENT, FAILED_PRECONDITION, ALREADY_EXISTS, OUT_OF_RANGE or RESOURCE_EXHAUSTED:
     the request was refused as asked; change it
  {EXIT_UNAVAILABLE}  UNAVAILABLE, DEADLINE_EXCEEDED or CANCELLED: the control plane or the group's agents
     cannot be reached now; retrying may help
  {EXIT_SERVER}  INTERNAL, UNKNOWN, DATA_LOSS, UNIMPLEMENTED or ABORTED: the server failed
  {EXIT_UNHEALTHY}  `agents check`: a check of the profile failed (UNHEALTHY)
  {EXIT_HTTP}  `app call --fail`: the app answered with HTTP 400 or more (HTTP_ERROR)

Errors print one line on stderr: onprem: <CODE>: <message>, where CODE is the gRPC status
(e.g. UNAUTHENTICATED) or, for local failures, LOCAL_FILE, CHECKSUM_MISMATCH or USAGE.
Writes given --idempotency-key KEY may be sent again with the same KEY after an error: they happen once.
"""

_BY_CODE: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.UNAUTHENTICATED: EXIT_AUTH,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_AUTH,
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_REFUSED,
    grpc.StatusCode.FAILED_PRECONDITION: EXIT_REFUSED,
    grpc.StatusCode.ALREADY_EXISTS: EXIT_REFUSED,
    grpc.StatusCode.OUT_OF_RANGE: EXIT_REFUSED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: EXIT_REFUSED,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE,
    grpc.StatusCode.CANCELLED: EXIT_UNAVAILABLE,
    grpc.StatusCode.INTERNAL: EXIT_SERVER,
    grpc.StatusCode.UNKNOWN: EXIT_SERVER,
    grpc.StatusCode.DATA_LOSS: EXIT_SERVER,
    grpc.StatusCode.UNIMPLEMENTED: EXIT_SERVER,
    grpc.StatusCode.ABORTED: EXIT_SERVER,
}


class CliError(Exception):
    """A failure to report as `onprem: <code>: <message>` with an exit code."""

    def __init__(self, code: str, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.exit_code = exit_code

    def line(self) -> str:
        return f"onprem: {self.code}: {self.message}"


class ChecksumMismatch(CliError):
    def __init__(self, message: str) -> None:
        super().__init__("CHECKSUM_MISMATCH", message, EXIT_CHECKSUM)


class LocalFileError(CliError):
    def __init__(self, message: str) -> None:
        super().__init__("LOCAL_FILE", message, EXIT_LOCAL)


class UsageError(CliError):
    def __init__(self, message: str) -> None:
        super().__init__("USAGE", message, EXIT_USAGE)


def error_reason(error: grpc.RpcError) -> str:
    """The `google.rpc.ErrorInfo` reason the server attached, or "" when there is none."""
    if not isinstance(error, grpc.Call):
        return ""
    try:
        status = rpc_status.from_call(error)
    except ValueError:
        return ""
    if status is None:
        return ""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


def from_rpc_error(error: grpc.RpcError) -> CliError:
    """The CLI's view of a failed call: the status name, its message, and the exit code of its class."""
    code: grpc.StatusCode = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    message = (error.details() if isinstance(error, grpc.Call) else None) or str(error)
    exit_code = _BY_CODE.get(code, EXIT_ERROR)
    if error_reason(error) == "CHECKSUM_MISMATCH":
        exit_code = EXIT_CHECKSUM
    return CliError(code.name, message, exit_code)
