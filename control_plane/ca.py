"""The control plane's own certificate authority.

Made on first start in the state directory: an EC P-256 CA key and a
self-signed CA certificate, and a server certificate for both listeners. The
CA signs agent certificates from the CSRs that agents send at enrollment, so
an agent's private key never leaves its host.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from onprem.control_plane.private_state import private_dir, write_private

CA_VALIDITY = dt.timedelta(days=3650)
SERVER_VALIDITY = dt.timedelta(days=397)
AGENT_ID_PREFIX = "agent-"


class CsrError(ValueError):
    """The certificate signing request is malformed or not acceptable."""


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate the CA signed for an agent."""

    pem: bytes
    serial: int
    not_after: dt.datetime


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class CertificateAuthority:
    """Signs the control plane's server certificate and agents' certificates."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self._key = key
        self.certificate = cert

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def load_or_create(cls, directory: Path, common_name: str = "onprem control plane CA") -> CertificateAuthority:
        """Load the CA from `directory`, making it on first start."""
        private_dir(directory)
        key_path, cert_path = directory / "ca.key", directory / "ca.pem"
        if key_path.exists() and cert_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{key_path} is not an EC private key")
            return cls(key, x509.load_pem_x509_certificate(cert_path.read_bytes()))
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        # Keys 0600 from their first byte; certificates too, since the whole state folder is private.
        write_private(key_path, _key_pem(key))
        write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return cls(key, cert)

    def _builder(self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey, validity: dt.timedelta) -> x509.CertificateBuilder:
        now = _now()
        # Backdated a little for clocks that lag ours, but never by a large part of a short lifetime
        # (agents renew after two thirds of it).
        backdate = min(dt.timedelta(minutes=5), validity / 10)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - backdate)
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
        )

    def server_identity(self, directory: Path, hostnames: list[str]) -> tuple[bytes, bytes]:
        """Return (key PEM, certificate chain PEM) for the listeners.

        The certificate is re-issued when the names asked for are not all in
        it or it expires within 30 days, so adding a host name to the config
        takes effect on the next start.
        """
        key_path, cert_path = directory / "server.key", directory / "server.pem"
        wanted = sorted(set(hostnames))
        if key_path.exists() and cert_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            have = {str(n) for n in san.get_values_for_type(x509.DNSName)}
            have |= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
            fresh = cert.not_valid_after_utc - _now() > dt.timedelta(days=30)
            if fresh and set(wanted) <= have and cert.issuer == self.certificate.subject:
                return key_path.read_bytes(), cert_path.read_bytes() + self.cert_pem
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = []
        for host in wanted:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        cert = (
            self._builder(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, wanted[0])]),
                key.public_key(),
                SERVER_VALIDITY,
            )
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        key_pem = _key_pem(key)
        write_private(key_path, key_pem)
        write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return key_pem, cert.public_bytes(serialization.Encoding.PEM) + self.cert_pem

    def sign_agent_csr(self, csr_pem: bytes, agent_id: str, validity: dt.timedelta) -> IssuedCertificate:
        """Sign an agent's CSR; the certificate names `agent_id`, whatever the CSR asked for."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise CsrError(f"the CSR is not a PEM certificate signing request: {exc}") from exc
        if not csr.is_signature_valid:
            raise CsrError("the CSR's signature does not match its public key")
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.key_size < 256:
            raise CsrError("the CSR's key must be an EC key of at least 256 bits (P-256 or larger)")
        cert = (
            self._builder(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, agent_id)]),
                public_key,
                validity,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"onprem://agent/{agent_id}")]),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return IssuedCertificate(
            pem=cert.public_bytes(serialization.Encoding.PEM),
            serial=cert.serial_number,
            not_after=cert.not_valid_after_utc,
        )

