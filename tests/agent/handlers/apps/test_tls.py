"""App profiles over HTTPS: private CAs, client certificates (mTLS), and the
one explicit way to turn verification off, against a real TLS server that
requires a client certificate signed by a throwaway CA made here.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from onprem.agent.handlers.apps import AppHandler
from onprem.agent.handlers.base import RequestContext
from onprem.agent.profiles import AppProfile
from onprem.tunnel.errors import FailedPrecondition, Unavailable
from onprem.v1 import apps_pb2
from tests.support.apps_upstream import Upstream


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    #: A client certificate and key in one file, signed by a CA the server does not trust.
    rogue_client: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *, ca: bool = False, server: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer[0].subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        assert issuer is not None
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()), critical=False)
        usage = x509.oid.ExtendedKeyUsageOID.SERVER_AUTH if server else x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, rogue_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _issue("onprem test CA", ca_key, None, ca=True)
    rogue = _issue("rogue CA", rogue_key, None, ca=True)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    files = {
        "ca.pem": _pem(ca),
        "server.pem": _pem(_issue("app.internal", server_key, (ca, ca_key), server=True)),
        "server.key": _key_pem(server_key),
        "client.pem": _pem(_issue("onprem-agent-test", client_key, (ca, ca_key))),
        "client.key": _key_pem(client_key),
        "rogue-client.pem": _pem(_issue("rogue-agent", client_key, (rogue, rogue_key))) + _key_pem(client_key),
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    return Pki(ca=d / "ca.pem", server_cert=d / "server.pem", server_key=d / "server.key",
               client_cert=d / "client.pem", client_key=d / "client.key", rogue_client=d / "rogue-client.pem")


@pytest.fixture(scope="module")
def mtls_app(pki: Pki) -> Iterator[Upstream]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.verify_mode = ssl.CERT_REQUIRED
    server = Upstream(tls=context).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def plain_app() -> Iterator[Upstream]:
    server = Upstream().start()
    yield server
    server.stop()


@pytest.fixture
async def handler(pki: Pki, mtls_app: Upstream, plain_app: Upstream, tmp_path: Path) -> AsyncIterator[AppHandler]:
    url = mtls_app.base_url
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    profiles = {
        "mtls": AppProfile(name="mtls", base_url=url, ca_file=str(pki.ca), client_cert_file=str(pki.client_cert),
                           client_key_file=str(pki.client_key)),
        "no-client-cert": AppProfile(name="no-client-cert", base_url=url, ca_file=str(pki.ca)),
        "rogue-client-cert": AppProfile(name="rogue-client-cert", base_url=url, ca_file=str(pki.ca),
                                        client_cert_file=str(pki.rogue_client)),
        "system-cas": AppProfile(name="system-cas", base_url=url, client_cert_file=str(pki.client_cert),
                                 client_key_file=str(pki.client_key)),
        "unverified": AppProfile(name="unverified", base_url=url, tls_verify=False,
                                 client_cert_file=str(pki.client_cert), client_key_file=str(pki.client_key)),
        "garbage-cert": AppProfile(name="garbage-cert", base_url=url, ca_file=str(pki.ca),
                                   client_cert_file=str(garbage)),
        "tls-to-plain": AppProfile(name="tls-to-plain", base_url=plain_app.base_url.replace("http:", "https:"),
                                   ca_file=str(pki.ca)),
    }
    handler = AppHandler(profiles)
    yield handler
    await handler.aclose()


async def get(handler: AppHandler, profile: str, path: str = "x") -> tuple[int, bytes]:
    call = apps_pb2.AppCall(head=apps_pb2.CallHead(profile=profile, path=path))
    chunks = [c async for c in handler.handle(call, RequestContext(request_id=1, body=None))]
    return chunks[0].call.head.status_code, b"".join(c.call.body for c in chunks[1:])


async def test_a_client_certificate_and_private_ca_reach_an_app_that_requires_mtls(handler: AppHandler) -> None:
    status, body = await get(handler, "mtls")
    assert status == 200
    assert json.loads(body)["client_cert_cn"] == "onprem-agent-test"


async def test_calls_of_a_profile_share_one_pooled_tls_connection(handler: AppHandler) -> None:
    ports = {json.loads((await get(handler, "mtls"))[1])["client_port"] for _ in range(3)}
    assert len(ports) == 1


async def test_an_app_requiring_a_client_certificate_the_agent_lacks_is_unavailable_naming_tls(
    handler: AppHandler,
) -> None:
    # Whether the server's TLS 1.3 alert or its reset reaches the agent first is a race: both say why.
    with pytest.raises(Unavailable, match=r"app profile 'no-client-cert' .*: (TLS|connection): .*client certificate"):
        await get(handler, "no-client-cert")


async def test_a_client_certificate_from_another_ca_is_unavailable_naming_tls(handler: AppHandler) -> None:
    with pytest.raises(Unavailable, match=r"(TLS: the app refused the agent's|connection: .*) client certificate"):
        await get(handler, "rogue-client-cert")


async def test_an_app_certificate_from_a_private_ca_is_not_trusted_without_ca_file(handler: AppHandler) -> None:
    with pytest.raises(Unavailable, match=r"TLS: the app's certificate is not trusted .*set ca_file") as info:
        await get(handler, "system-cas")
    assert info.value.reason == "APP_UNREACHABLE"


async def test_https_to_a_plain_http_port_says_so(handler: AppHandler) -> None:
    with pytest.raises(Unavailable, match=r"TLS: the app did not answer with TLS"):
        await get(handler, "tls-to-plain")


async def test_an_unreadable_client_certificate_is_failed_precondition_naming_the_file(handler: AppHandler) -> None:
    with pytest.raises(FailedPrecondition, match=r"cannot load the client certificate .*garbage\.pem") as info:
        await get(handler, "garbage-cert")
    assert info.value.reason == "TLS_CONFIG"


async def test_verification_turned_off_works_and_is_logged_as_a_warning_at_load(
    pki: Pki, mtls_app: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    profile = AppProfile(name="unverified", base_url=mtls_app.base_url, tls_verify=False,
                         client_cert_file=str(pki.client_cert), client_key_file=str(pki.client_key))
    with caplog.at_level(logging.WARNING, logger="onprem.agent.apps"):
        handler = AppHandler({"unverified": profile})
    try:
        assert [(r.levelname, "'unverified'" in r.message and "verification is OFF" in r.message)
                for r in caplog.records] == [("WARNING", True)]
        assert (await get(handler, "unverified"))[0] == 200
    finally:
        await handler.aclose()


async def test_check_of_an_mtls_profile_passes_every_stage(handler: AppHandler) -> None:
    checks = await handler.check("mtls")
    assert [(c.name, c.ok) for c in checks] == [("reachable", True), ("tls", True), ("credentials", True)]
    assert "with the client certificate" in checks[1].message


@pytest.mark.parametrize(("profile", "why"), [
    ("no-client-cert", "client certificate"),
    ("system-cas", "not trusted"),
    ("rogue-client-cert", "client certificate"),
])
async def test_check_tells_a_tls_failure_from_an_unreachable_app(handler: AppHandler, profile: str, why: str) -> None:
    checks = await handler.check(profile)
    assert [(c.name, c.ok) for c in checks] == [("reachable", True), ("tls", False)]
    assert why in checks[1].message


async def test_check_of_an_unverified_profile_warns(handler: AppHandler) -> None:
    checks = await handler.check("unverified")
    assert [(c.name, c.ok) for c in checks] == [("reachable", True), ("tls", True), ("credentials", True)]
    assert checks[1].message.startswith("WARNING") and "tls_verify: false" in checks[1].message


async def test_check_of_an_unloadable_certificate_fails_on_tls(handler: AppHandler) -> None:
    checks = await handler.check("garbage-cert")
    assert [(c.name, c.ok) for c in checks] == [("tls", False)]
