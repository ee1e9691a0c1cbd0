"""The console's listener: HTTPS only, with the control plane's own certificate, every response hardened."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import aiohttp
import pytest

from onprem.control_plane.console import Console, ConsoleConfig
from onprem.control_plane.console.listener import split_address
from onprem.control_plane.console.render import SECURITY_HEADERS
from tests.control_plane.console.conftest import Site

EXPECTED_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
                "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


async def test_the_console_speaks_tls_with_a_certificate_the_control_planes_ca_signed(site: Site) -> None:
    browser = await site.browser()  # trusts only the control plane's CA
    status, _, _ = await browser.get("/login")
    assert status == 200


async def test_a_client_that_trusts_only_the_system_cas_is_refused_by_tls(site: Site) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.get(site.base + "/login")


async def test_plain_http_is_not_served(site: Site) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            await session.get(site.base.replace("https://", "http://") + "/login")


@pytest.mark.parametrize("path", ["/login", "/", "/agents", "/static/console.css", "/static/nothing.js", "/nowhere"])
async def test_every_response_carries_the_security_headers(site: Site, path: str) -> None:
    browser = await site.browser()
    _, _, response = await browser.get(path)
    assert response.headers["Content-Security-Policy"] == EXPECTED_CSP
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "same-origin"
    assert {name: response.headers[name] for name in SECURITY_HEADERS} == SECURITY_HEADERS


async def test_pages_are_never_cached_and_assets_are_kept_privately(site: Site) -> None:
    browser = await site.browser()
    await browser.login(site.admin_token)
    _, _, page = await browser.get("/")
    _, css, asset = await browser.get("/static/console.css")
    assert page.headers["Cache-Control"] == "no-store"
    assert asset.headers["Cache-Control"] == "private, max-age=86400"
    assert asset.headers["Content-Type"] == "text/css; charset=utf-8"
    assert "unicode-bidi: isolate" in css


async def test_the_script_is_served_as_javascript_and_the_page_loads_no_inline_script(site: Site) -> None:
    browser = await site.browser()
    await browser.login(site.admin_token)
    _, page, _ = await browser.get("/")
    _, script, response = await browser.get("/static/console.js")
    assert response.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert "DOMParser" in script
    assert page.count("<script") == 1
    assert '<script src="/static/console.js?v=' in page
    assert " style=" not in page and "<style" not in page


def test_a_console_address_is_host_and_port() -> None:
    assert split_address("127.0.0.1:8446") == ("127.0.0.1", 8446)
    assert split_address("[::1]:8446") == ("::1", 8446)
    assert split_address("0.0.0.0:0") == ("0.0.0.0", 0)
    for bad in ("8446", "localhost", ":8446", "host:port", "host:70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            split_address(bad)


def test_the_tls_context_refuses_versions_before_1_2() -> None:
    from onprem.control_plane.console.listener import tls_context

    assert ssl.TLSVersion.TLSv1_2 > ssl.TLSVersion.TLSv1_1  # the comparison below means "at least 1.2"
    with pytest.raises(ssl.SSLError):
        tls_context(b"not a key", b"not a certificate")


async def test_a_busy_port_stops_the_console_from_starting_with_a_message_naming_it(site: Site, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        console = Console(site.cp, ConsoleConfig(f"127.0.0.1:{port}"))
        key, chain = site.cp.ca.server_identity(tmp_path / "ca", ["127.0.0.1"])
        with pytest.raises(OSError, match=rf"cannot listen on 127\.0\.0\.1:{port} for the console"):
            await console.start(key, chain)
        await console.stop()  # nothing to stop: harmless
