"""`onprem.v1.Enrollment/Enroll`: an enrollment token and a CSR in, a certificate out.

Served on its own TLS listener without client certificates (grpcio's Python
API can either require client certificates or not ask for them, not ask for
them optionally, so the tunnel's mTLS listener cannot serve it too).

Anyone who can reach the listener may call it, so it is written for guessers:
- the token is checked (a read, spending nothing) before any signing work, and
  spent atomically only once the CSR is known to be good, so a bad CSR does not
  burn a good token and concurrent uses of one token have one winner;
- every refused attempt is audited (anonymous, with the caller's address, the
  token's id when it has a well-formed one, and why);
- each address may fail `enroll_failure_burst` times at once, then once every
  `enroll_refill_seconds`: later attempts wait for their turn (one at a time per
  address; more are RESOURCE_EXHAUSTED at once), see `control_plane.throttle`.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

import grpc

from onprem.control_plane.api import errors
from onprem.control_plane.ca import AGENT_ID_PREFIX, CsrError
from onprem.control_plane.core import ControlPlane
from onprem.control_plane.observe import Observation
from onprem.control_plane.store import enrollment_token_id, validate_agent_name
from onprem.control_plane.throttle import Throttled, peer_key
from onprem.tunnel.errors import InvalidArgument, ResourceExhausted
from onprem.v1 import enrollment_pb2, enrollment_pb2_grpc

log = logging.getLogger("onprem.control_plane.enrollment")

METHOD = "/onprem.v1.Enrollment/Enroll"


class EnrollmentService(enrollment_pb2_grpc.EnrollmentServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self._cp = cp

    @errors.unary
    async def Enroll(
        self, request: enrollment_pb2.EnrollRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> enrollment_pb2.EnrollResponse:
        peer = context.peer()
        key = peer_key(peer)
        throttle = self._cp.enroll_throttle
        with self._cp.observer.observe(method=METHOD, peer=peer, kind="enroll", role="agent") as observation:
            token_id = enrollment_token_id(request.token)
            observation.note = f"enrollment token onpe_{token_id}: " if token_id else ""
            try:
                await throttle.admit(key)
            except Throttled as exc:
                raise ResourceExhausted(
                    f"too many failed enrollment attempts from {exc.key}; wait {exc.retry_after:.0f} s and check "
                    "the token (enrollment tokens are single use: ask an admin for a new one)",
                    reason="ENROLLMENT_THROTTLED") from None
            response = await self._enroll(request, peer, observation)
        throttle.succeeded(key)
        return response

    async def _enroll(self, request: enrollment_pb2.EnrollRequest, peer: str,
                      observation: Observation) -> enrollment_pb2.EnrollResponse:
        if not request.token:
            raise InvalidArgument("'token' is required: an enrollment token from an admin", reason="MISSING_TOKEN")
        if not request.csr_pem:
            raise InvalidArgument("'csr_pem' is required: a PEM certificate signing request", reason="MISSING_CSR")
        name = request.name or request.hostname or "agent"
        try:
            validate_agent_name(name)
        except ValueError as exc:
            raise InvalidArgument(f"'name': {exc}", reason="INVALID_NAME") from None
        cp = self._cp
        # The token first, spending nothing: a guesser must not get any signing work out of us. A token
        # that cannot enroll raises EnrollmentTokenRefused (PERMISSION_DENIED, BAD_ENROLLMENT_TOKEN).
        await cp.blocking(cp.store.check_enrollment_token, request.token)
        agent_id = AGENT_ID_PREFIX + secrets.token_hex(8)
        # Then the CSR, before spending the token: a bad CSR must not burn a good single-use token.
        try:
            issued = cp.ca.sign_agent_csr(request.csr_pem.encode(), agent_id, cp.settings.agent_cert_validity)
        except CsrError as exc:
            raise InvalidArgument(str(exc), reason="BAD_CSR") from None
        # Atomic: of concurrent enrollments with one token, one wins; the others' certificates are dropped.
        token = await cp.blocking(cp.store.consume_enrollment_token, request.token, agent_id)
        await cp.blocking(
            cp.store.add_agent, agent_id, name, token.group_name, request.hostname[:255], "",
            issued.serial, issued.not_after,
        )
        log.info("enrolled agent %s (%s) into group %s", name, agent_id, token.group_name)
        observation.record(f"agent {name}", group=token.group_name, agent_id=agent_id, kind="admin",
                           principal_name=f"enrollment-token:{token.token_id}")
        response = enrollment_pb2.EnrollResponse(
            agent_id=agent_id,
            group=token.group_name,
            certificate_pem=issued.pem.decode(),
            ca_pem=cp.ca.cert_pem.decode(),
        )
        response.expires_at.FromDatetime(issued.not_after)
        return response
