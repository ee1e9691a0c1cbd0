"""`onprem.v1.Enrollment/Enroll`: an enrollment token and a CSR in, a certificate out.

Served on its own TLS listener without client certificates (grpcio's Python
API can either require client certificates or not ask for them, not ask for
them optionally, so the tunnel's mTLS listener cannot serve it too).
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
from typing import Any

import grpc

from control_plane.api import errors
from control_plane.app import ControlPlane
from control_plane.ca import AGENT_ID_PREFIX, CsrError
from control_plane.store import AuditEntry, TokenError, validate_agent_name
from onprem.v1 import enrollment_pb2, enrollment_pb2_grpc
from tunnel.errors import Code, InvalidArgument, PermissionDenied

log = logging.getLogger("onprem.control_plane.enrollment")


class EnrollmentService(enrollment_pb2_grpc.EnrollmentServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self._cp = cp

    @errors.unary
    async def Enroll(
        self, request: enrollment_pb2.EnrollRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> enrollment_pb2.EnrollResponse:
        if not request.token:
            raise InvalidArgument("'token' is required: an enrollment token from an admin", reason="MISSING_TOKEN")
        if not request.csr_pem:
            raise InvalidArgument("'csr_pem' is required: a PEM certificate signing request", reason="MISSING_CSR")
        name = request.name or request.hostname or "agent"
        try:
            validate_agent_name(name)
        except ValueError as exc:
            raise InvalidArgument(f"'name': {exc}", reason="INVALID_NAME") from None
        agent_id = AGENT_ID_PREFIX + secrets.token_hex(8)
        validity = self._cp.settings.agent_cert_validity
        # Sign first: a bad CSR must not burn the single-use token.
        try:
            issued = self._cp.ca.sign_agent_csr(request.csr_pem.encode(), agent_id, validity)
        except CsrError as exc:
            raise InvalidArgument(str(exc), reason="BAD_CSR") from None
        try:
            token = await self._cp.blocking(self._cp.store.consume_enrollment_token, request.token, agent_id)
        except TokenError as exc:
            raise PermissionDenied(str(exc), reason="BAD_ENROLLMENT_TOKEN") from None
        await self._cp.blocking(
            self._cp.store.add_agent, agent_id, name, token.group_name, request.hostname[:255], "",
            issued.serial, issued.not_after,
        )
        log.info("enrolled agent %s (%s) into group %s", name, agent_id, token.group_name)
        self._cp.audit.record(AuditEntry(
            at=dt.datetime.now(dt.UTC), principal=f"enrollment-token:{token.token_id}", role="agent",
            method="/onprem.v1.Enrollment/Enroll", kind="admin", code=int(Code.OK), outcome="OK",
            group_name=token.group_name, agent_id=agent_id, detail=f"agent {name}",
        ))
        response = enrollment_pb2.EnrollResponse(
            agent_id=agent_id,
            group=token.group_name,
            certificate_pem=issued.pem.decode(),
            ca_pem=self._cp.ca.cert_pem.decode(),
        )
        response.expires_at.FromDatetime(issued.not_after)
        return response
