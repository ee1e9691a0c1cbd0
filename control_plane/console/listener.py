"""The console's listener: HTTPS with the control plane's server certificate, on the running event loop.

Started and stopped by `ControlPlaneServer` with the gRPC servers (`--console-listen`; none by default).
aiohttp serves on the loop grpc.aio already runs on, so that the console reads the same registry of
agent sessions and token authority as the API, with no thread or process between them.
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from onprem.control_plane.console.app import make_app
from onprem.control_plane.console.context import ConsoleSettings
from onprem.control_plane.core import ControlPlane

log = logging.getLogger("onprem.control_plane.console")

#: Seconds a stopping console gives requests in progress (they are short: pages and forms).
SHUTDOWN_TIMEOUT = 2.0


@dataclass(frozen=True)
class ConsoleConfig:
    #: host:port to listen on (e.g. "127.0.0.1:8446"; "0.0.0.0:8446" for every address).
    listen: str
    settings: ConsoleSettings = field(default_factory=ConsoleSettings)


def split_address(address: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6]:port"; ValueError saying what is expected otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"the console's address must be HOST:PORT, e.g. 127.0.0.1:8446 (got {address!r})")
    return host.strip("[]"), int(port)


def tls_context(key_pem: bytes, chain_pem: bytes) -> ssl.SSLContext:
    """A server context with the control plane's own key and certificate chain, TLS 1.2 at least."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # The ssl module loads a certificate chain from files only: a private folder, gone at once.
    with tempfile.TemporaryDirectory(prefix="onprem-console-") as folder:
        key, chain = Path(folder) / "server.key", Path(folder) / "server.pem"
        key.touch(mode=0o600)
        key.write_bytes(key_pem)
        chain.write_bytes(chain_pem)
        context.load_cert_chain(chain, key)
    return context


class Console:
    def __init__(self, cp: ControlPlane, config: ConsoleConfig) -> None:
        self._cp = cp
        self.config = config
        # The CA that agents must trust is the control plane's own, whatever the settings say.
        self.app = make_app(cp, dataclasses.replace(config.settings, ca_pem=cp.ca.cert_pem))
        self._runner: web.AppRunner | None = None
        #: The port it listens on, once started (the one asked for, or the one the system chose for 0).
        self.port: int | None = None

    async def start(self, key_pem: bytes, chain_pem: bytes) -> None:
        host, port = split_address(self.config.listen)
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                               shutdown_timeout=SHUTDOWN_TIMEOUT)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=tls_context(key_pem, chain_pem), reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(f"cannot listen on {self.config.listen} for the console ({exc.strerror or exc})") from exc
        self._runner = runner
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port
        log.info("console on https://%s:%d/", host if ":" not in host else f"[{host}]", self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
