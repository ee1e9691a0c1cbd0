"""The credentials an app profile adds to every call, and its TLS settings.

Secrets are read per call (files in a worker thread), so a rotated token or
a remounted secret file needs no restart, and are checked for line breaks so
that a stray newline in a file can never split a header. Messages name where
a secret lives, never its value.
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
from dataclasses import dataclass

from onprem.agent.handlers.apps.confine import CONTROL
from onprem.agent.profiles.apps import AppProfile, SecretSource
from onprem.tunnel.errors import FailedPrecondition

__all__ = ["Injected", "injected_headers", "ssl_context"]


@dataclass(frozen=True)
class Injected:
    """Headers to add, and every secret string a response must not echo back."""

    headers: list[tuple[str, str]]
    secrets: list[str]


def _read_file(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    # Editors and `echo` end files with a newline that is not part of the secret.
    return text[:-1] if text.endswith("\n") else text


def _resolve(profile: AppProfile, source: SecretSource, what: str, files: dict[str, str]) -> str:
    if source.env is not None:
        value = os.environ.get(source.env)
        if value is None:
            raise FailedPrecondition(
                f"app profile '{profile.name}': environment variable {source.env} (for {what}) is not set",
                reason="MISSING_SECRET")
    else:
        assert source.file is not None
        value = files[source.file]
    if CONTROL.search(value.replace("\t", " ")):
        raise FailedPrecondition(
            f"app profile '{profile.name}': the {source.describe()} (for {what}) holds a line break or "
            "control character", reason="INVALID_SECRET")
    return value


def _sources(profile: AppProfile) -> list[SecretSource]:
    sources = [SecretSource(file=path) for path in profile.headers_from_file.values()]
    if profile.bearer_token is not None:
        sources.append(profile.bearer_token)
    if profile.basic_auth is not None:
        sources.append(profile.basic_auth.password)
        if profile.basic_auth.username_source is not None:
            sources.append(profile.basic_auth.username_source)
    return sources


def _read_files(profile: AppProfile, paths: list[str]) -> dict[str, str]:
    files: dict[str, str] = {}
    for path in paths:
        try:
            files[path] = _read_file(path)
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise FailedPrecondition(f"app profile '{profile.name}': cannot read secret file {path}: {why}",
                                     reason="MISSING_SECRET") from None
    return files


async def injected_headers(profile: AppProfile) -> Injected:
    """The profile's credentials as headers; FailedPrecondition naming the source when one is missing."""
    paths = sorted({s.file for s in _sources(profile) if s.file is not None})
    files = await asyncio.to_thread(_read_files, profile, paths) if paths else {}
    headers: list[tuple[str, str]] = []
    secrets: list[str] = []
    for name, env in profile.headers_from_env.items():
        value = _resolve(profile, SecretSource(env=env), f"header {name}", files)
        headers.append((name, value))
        secrets.append(value)
    for name, path in profile.headers_from_file.items():
        value = _resolve(profile, SecretSource(file=path), f"header {name}", files)
        headers.append((name, value))
        secrets.append(value)
    if profile.bearer_token is not None:
        token = _resolve(profile, profile.bearer_token, "the bearer token", files)
        headers.append(("Authorization", f"Bearer {token}"))
        secrets.append(token)
    if profile.basic_auth is not None:
        auth = profile.basic_auth
        username = auth.username if auth.username_source is None else _resolve(
            profile, auth.username_source, "the basic-auth username", files)
        password = _resolve(profile, auth.password, "the basic-auth password", files)
        assert username is not None
        encoded = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        headers.append(("Authorization", f"Basic {encoded}"))
        secrets += [password, encoded]
    return Injected(headers=headers, secrets=secrets)


def ssl_context(profile: AppProfile) -> ssl.SSLContext:
    """The TLS settings of an https profile; blocking (reads files): call it in a worker thread.

    With `ca_file` only that bundle is trusted, not the system's: a private
    CA's profile should not also accept any public certificate for its name.
    Raises FailedPrecondition naming the file that cannot be used.
    """
    try:
        context = ssl.create_default_context(cafile=profile.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise FailedPrecondition(f"app profile '{profile.name}': cannot load ca_file {profile.ca_file}: {exc}",
                                 reason="TLS_CONFIG") from None
    if not profile.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if profile.client_cert_file is not None:
        try:
            context.load_cert_chain(profile.client_cert_file, profile.client_key_file)
        except (OSError, ssl.SSLError) as exc:
            raise FailedPrecondition(
                f"app profile '{profile.name}': cannot load the client certificate {profile.client_cert_file}"
                f"{' with key ' + profile.client_key_file if profile.client_key_file else ''}: {exc}",
                reason="TLS_CONFIG") from None
    return context
