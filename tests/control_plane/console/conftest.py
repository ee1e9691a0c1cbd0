"""A control plane in this process with its console listening on HTTPS, and a browser-like client for it.

The control plane is the real one (SQLite store, CA, token authority, audit writer) without its gRPC
listeners: the console is what is under test, on its real TLS listener, spoken to by an aiohttp client
that keeps cookies as a browser does (the session cookie is Secure: it travels over HTTPS only).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from onprem.control_plane.ca import CertificateAuthority
from onprem.control_plane.console import Console, ConsoleConfig
from onprem.control_plane.console.context import ConsoleSettings
from onprem.control_plane.core import ControlPlane, Settings
from onprem.control_plane.store import AuditEntry, Store

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@dataclass
class Site:
    cp: ControlPlane
    console: Console
    base: str
    ca_pem: bytes
    admin_token: str
    clients: list[Browser] = field(default_factory=list)

    @property
    def store(self) -> Store:
        return self.cp.store

    def token(self, name: str, role: str = "operator", groups: tuple[str, ...] = ("*",),
              ttl: dt.timedelta | None = None) -> str:
        token, _row = self.store.create_api_token(name, role, list(groups), ttl)  # type: ignore[arg-type]
        return token

    async def browser(self) -> Browser:
        context = ssl.create_default_context(cadata=self.ca_pem.decode())
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context),
                                        cookie_jar=aiohttp.CookieJar(unsafe=True))
        client = Browser(self, session)
        self.clients.append(client)
        return client

    async def audit_rows(self, matching: Callable[[AuditEntry], bool], count: int = 1,
                         within: float = 10.0) -> list[AuditEntry]:
        """The audit rows that match, once at least `count` of them are written (the writer batches)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            rows = [r for r in await self.cp.blocking(self.store.list_audit, 1000) if matching(r)]
            if len(rows) >= count or loop.time() > deadline:
                return rows
            await asyncio.sleep(0.05)


@dataclass
class Browser:
    """Cookies, the last page's CSRF token, and requests as a page's links and forms make them."""

    site: Site
    session: aiohttp.ClientSession
    csrf: str = ""

    def url(self, path: str) -> str:
        return self.site.base + path

    @property
    def origin(self) -> str:
        return self.site.base

    async def get(self, path: str, **kwargs: Any) -> tuple[int, str, aiohttp.ClientResponse]:
        async with self.session.get(self.url(path), allow_redirects=False, **kwargs) as response:
            text = await response.text()
        found = CSRF.search(text)
        if found:
            self.csrf = found.group(1)
        return response.status, text, response

    async def post(self, path: str, data: dict[str, str], *, csrf: str | None = None, origin: str | None = "self",
                   follow: bool = False, **kwargs: Any) -> tuple[int, str, aiohttp.ClientResponse]:
        """A form's POST: with the last page's CSRF token unless `csrf` is given ("" for none)."""
        form = dict(data)
        token = self.csrf if csrf is None else csrf
        if token:
            form["csrf_token"] = token
        headers = dict(kwargs.pop("headers", {}))
        if origin is not None:
            headers["Origin"] = self.origin if origin == "self" else origin
        async with self.session.post(self.url(path), data=form, headers=headers, allow_redirects=follow,
                                     **kwargs) as response:
            text = await response.text()
        found = CSRF.search(text)
        if found:
            self.csrf = found.group(1)
        return response.status, text, response

    async def login(self, token: str) -> tuple[int, str, aiohttp.ClientResponse]:
        await self.get("/login")
        return await self.post("/login", {"token": token, "next": "/"})

    def session_cookie(self) -> str | None:
        for cookie in self.session.cookie_jar:
            if cookie.key == "__Host-onprem-console":
                return cookie.value
        return None


@pytest.fixture
def console_settings() -> ConsoleSettings:
    return ConsoleSettings(login_failure_burst=3, login_refill_seconds=30.0)


@pytest.fixture
async def site(tmp_path: Path, console_settings: ConsoleSettings) -> AsyncIterator[Site]:
    store = Store(f"sqlite:///{tmp_path / 'control-plane.db'}")
    store.create_schema()
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    cp = ControlPlane(store, ca, Settings(token_watch_interval=0.1))
    key, chain = ca.server_identity(tmp_path / "ca", ["127.0.0.1"])
    console = Console(cp, ConsoleConfig("127.0.0.1:0", console_settings))
    await console.start(key, chain)
    writer = asyncio.get_running_loop().create_task(cp.audit.run(), name="audit-writer")
    admin, _ = store.create_api_token("root", "admin", ["*"], no_expiry=True)
    site = Site(cp, console, f"https://127.0.0.1:{console.port}", ca.cert_pem, admin)
    try:
        yield site
    finally:
        for client in site.clients:
            await client.session.close()
        await console.stop()
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        cp.close()


def add_agent(site: Site, agent_id: str, group: str, name: str | None = None, *, hostname: str = "host.internal",
              version: str = "0.1.0", profiles: tuple[dict[str, Any], ...] = ()) -> None:
    """An enrolled agent that is not connected (the console shows it lost)."""
    site.store.ensure_group(group)
    site.store.add_agent(agent_id=agent_id, name=name or agent_id, group_name=group, hostname=hostname,
                         version=version, cert_serial=1, cert_expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(days=20),
                         profiles=profiles)
