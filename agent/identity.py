"""The agent's identity: its key, its certificate, and who it is.

`enroll` makes the key pair here and sends only a CSR; the control plane
signs it. The key file is created mode 0600 and never leaves the host.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

KEY_FILE, CERT_FILE, META_FILE = "agent.key", "agent.pem", "agent.json"


class IdentityError(Exception):
    """The identity directory is missing, incomplete or unreadable."""


@dataclass(frozen=True)
class Identity:
    agent_id: str
    group: str
    key_pem: bytes
    cert_pem: bytes

    @property
    def not_after(self) -> dt.datetime:
        return x509.load_pem_x509_certificate(self.cert_pem).not_valid_after_utc

    @property
    def not_before(self) -> dt.datetime:
        return x509.load_pem_x509_certificate(self.cert_pem).not_valid_before_utc


def certificate_checks(identity: Identity, ca_file: Path) -> list[tuple[bool, str, str]]:
    """(ok, name, message) for: signed by the configured CA, currently valid, and how long it has left."""
    cert = x509.load_pem_x509_certificate(identity.cert_pem)
    results: list[tuple[bool, str, str]] = []
    try:
        ca = x509.load_pem_x509_certificate(ca_file.read_bytes())
        cert.verify_directly_issued_by(ca)
        results.append((True, "certificate issuer", f"signed by the control plane's CA ({ca_file})"))
    except (OSError, ValueError, TypeError, InvalidSignature) as exc:
        results.append((False, "certificate issuer", f"not signed by the CA in {ca_file}: {exc or type(exc).__name__}"))
    now = dt.datetime.now(dt.UTC)
    left = cert.not_valid_after_utc - now
    if now < cert.not_valid_before_utc:
        results.append((False, "certificate validity", "not valid yet: is this host's clock right?"))
    elif left <= dt.timedelta(0):
        results.append((False, "certificate validity",
                        f"expired on {cert.not_valid_after_utc.isoformat()}: enroll the agent again"))
    else:
        results.append((True, "certificate validity",
                        f"valid until {cert.not_valid_after_utc.isoformat()} ({left.days} days, "
                        f"{left.seconds // 3600} hours left; renewed automatically while connected)"))
    return results


def make_key_and_csr(name: str) -> tuple[bytes, bytes]:
    """Make an EC P-256 key and a CSR for it."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_identity(directory: Path, identity: Identity) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_atomic(directory / KEY_FILE, identity.key_pem, 0o600)
    _write_atomic(directory / CERT_FILE, identity.cert_pem, 0o644)
    meta = {"agent_id": identity.agent_id, "group": identity.group}
    _write_atomic(directory / META_FILE, json.dumps(meta, indent=2).encode() + b"\n", 0o644)


def load_identity(directory: Path) -> Identity:
    try:
        meta = json.loads((directory / META_FILE).read_text())
        return Identity(
            agent_id=str(meta["agent_id"]),
            group=str(meta["group"]),
            key_pem=(directory / KEY_FILE).read_bytes(),
            cert_pem=(directory / CERT_FILE).read_bytes(),
        )
    except FileNotFoundError as exc:
        raise IdentityError(
            f"no agent identity in {directory} ({exc.filename} is missing): run `onprem-agent enroll` first"
        ) from exc
    except (OSError, ValueError, KeyError) as exc:
        raise IdentityError(f"the agent identity in {directory} is unreadable: {exc}") from exc
