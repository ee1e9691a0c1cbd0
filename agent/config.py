"""The agent's YAML config: where the control plane is, where the identity
lives, and the profiles the site allows.

    control_plane: {address: cp.example.com:8444, ca_file: /etc/onprem-agent/ca.pem, max_streams: 3}
    identity_dir: /var/lib/onprem-agent
    max_in_flight: 64
    profiles: {databases: {...}, folders: {...}, apps: {...}}

`control_plane.enroll_address` defaults to the same host at port 8445, where
the control plane serves enrollment without a client certificate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from onprem.agent.profiles import ConfigError, Profiles, parse_profiles

DEFAULT_ENROLL_PORT = 8445
#: Streams the agent holds at most, one per control-plane replica, by default and at most.
DEFAULT_MAX_STREAMS = 3
MAX_STREAMS = 16


@dataclass(frozen=True)
class ControlPlaneConfig:
    #: host:port of the agent listener (mTLS, the tunnel).
    address: str
    #: host:port of the enrollment listener (TLS, no client certificate).
    enroll_address: str
    #: The control plane's CA certificate, which signs its server certificate.
    ca_file: Path
    #: The TLS name to expect, when it differs from the host in `address`.
    server_name: str | None = None
    #: An HTTP CONNECT proxy to reach the control plane through, "http://host:port"
    #: (user and password, if any, from `proxy_username` / `proxy_password_env`).
    proxy: str | None = None
    proxy_username: str | None = None
    proxy_password_env: str | None = None
    #: The most streams the agent holds at once, one per control-plane replica the control plane names.
    max_streams: int = DEFAULT_MAX_STREAMS

    def proxy_url(self) -> str | None:
        """The proxy URL with its credentials, for gRPC's `grpc.http_proxy`; never log it."""
        if self.proxy is None:
            return None
        if not self.proxy_username:
            return self.proxy
        import os
        from urllib.parse import quote

        password = os.environ.get(self.proxy_password_env or "", "")
        scheme, _, rest = self.proxy.partition("://")
        return f"{scheme}://{quote(self.proxy_username, safe='')}:{quote(password, safe='')}@{rest}"


@dataclass(frozen=True)
class AgentConfig:
    control_plane: ControlPlaneConfig
    identity_dir: Path
    profiles: Profiles
    max_in_flight: int = 64
    name: str | None = None
    #: On SIGTERM, how long in-flight requests may take before they are cancelled.
    drain_grace_seconds: float = 30.0
    #: How often every profile is checked (reachable, credentials accepted).
    health_check_interval_seconds: float = 60.0
    #: host:port for Prometheus metrics (a listening port: opt-in, local by default).
    metrics_listen: str | None = None
    #: Where to export spans over OTLP/gRPC, e.g. "http://127.0.0.1:4317"; None: the OTEL_EXPORTER_OTLP_*
    #: environment decides, and with none of it no spans are made.
    otlp_endpoint: str | None = None
    #: The spans' service.name (OTEL_SERVICE_NAME wins over it); None: "onprem-agent".
    service_name: str | None = None


def _split_host_port(address: str, field: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{field}: expected host:port, got {address!r}")
    return host, int(port)


def parse_config(raw: Any, *, base_dir: Path) -> AgentConfig:
    """Validate a parsed YAML document; relative paths are taken from `base_dir`."""
    if not isinstance(raw, dict):
        raise ConfigError("the config must be a YAML mapping")
    unknown = set(raw) - {"control_plane", "identity_dir", "profiles", "max_in_flight", "name", "drain_grace_seconds",
                        "health_check_interval_seconds", "metrics_listen", "tracing"}
    if unknown:
        raise ConfigError(f"unknown top-level keys: {', '.join(sorted(unknown))}")
    cp = raw.get("control_plane")
    if not isinstance(cp, dict) or "address" not in cp or "ca_file" not in cp:
        raise ConfigError("control_plane: needs 'address' (host:port) and 'ca_file'")
    address = str(cp["address"])
    host, _ = _split_host_port(address, "control_plane.address")
    enroll_address = str(cp.get("enroll_address") or f"{host}:{DEFAULT_ENROLL_PORT}")
    _split_host_port(enroll_address, "control_plane.enroll_address")
    identity = raw.get("identity_dir")
    if not identity:
        raise ConfigError("identity_dir: required (where `enroll` writes the key and certificate)")
    max_in_flight = raw.get("max_in_flight", 64)
    if not isinstance(max_in_flight, int) or not 1 <= max_in_flight <= 10_000:
        raise ConfigError("max_in_flight: an integer from 1 to 10000")
    grace = raw.get("drain_grace_seconds", 30.0)
    if not isinstance(grace, int | float) or not 0 <= grace <= 3600:
        raise ConfigError("drain_grace_seconds: a number of seconds from 0 to 3600")
    proxy = cp.get("proxy")
    if proxy is not None:
        proxy = str(proxy)
        if not proxy.startswith("http://") or "@" in proxy:
            raise ConfigError("control_plane.proxy: expected http://host:port (credentials go in "
                              "proxy_username and proxy_password_env, never in the URL)")
        _split_host_port(proxy.removeprefix("http://").rstrip("/"), "control_plane.proxy")
    max_streams = cp.get("max_streams", DEFAULT_MAX_STREAMS)
    if isinstance(max_streams, bool) or not isinstance(max_streams, int) or not 1 <= max_streams <= MAX_STREAMS:
        raise ConfigError(f"control_plane.max_streams: an integer from 1 to {MAX_STREAMS} (the most streams the "
                          f"agent holds, one per control-plane replica), got {max_streams!r}")
    if cp.get("proxy_password_env") and not cp.get("proxy_username"):
        raise ConfigError("control_plane.proxy_password_env: set proxy_username too")
    metrics_listen = str(raw["metrics_listen"]) if raw.get("metrics_listen") else None
    if metrics_listen is not None:
        _split_host_port(metrics_listen, "metrics_listen")
    otlp_endpoint, service_name = _tracing(raw.get("tracing"))
    health_interval = raw.get("health_check_interval_seconds", 60.0)
    if not isinstance(health_interval, int | float) or not 1 <= health_interval <= 86400:
        raise ConfigError("health_check_interval_seconds: a number of seconds from 1 to 86400")
    return AgentConfig(
        control_plane=ControlPlaneConfig(
            address=address,
            enroll_address=enroll_address,
            ca_file=(base_dir / str(cp["ca_file"])).resolve(),
            server_name=str(cp["server_name"]) if cp.get("server_name") else None,
            proxy=proxy.rstrip("/") if proxy else None,
            proxy_username=str(cp["proxy_username"]) if cp.get("proxy_username") else None,
            proxy_password_env=str(cp["proxy_password_env"]) if cp.get("proxy_password_env") else None,
            max_streams=max_streams,
        ),
        identity_dir=(base_dir / str(identity)).resolve(),
        profiles=parse_profiles(raw.get("profiles") or {}),
        max_in_flight=max_in_flight,
        name=str(raw["name"]) if raw.get("name") else None,
        drain_grace_seconds=float(grace),
        health_check_interval_seconds=float(health_interval),
        metrics_listen=metrics_listen,
        otlp_endpoint=otlp_endpoint,
        service_name=service_name,
    )


def _tracing(raw: Any) -> tuple[str | None, str | None]:
    """`tracing: {otlp_endpoint: http://collector:4317, service_name: ...}`, checked."""
    if raw is None:
        return None, None
    if not isinstance(raw, dict):
        raise ConfigError("tracing: a mapping with otlp_endpoint (and optionally service_name)")
    unknown = set(raw) - {"otlp_endpoint", "service_name"}
    if unknown:
        raise ConfigError(f"tracing: unknown keys: {', '.join(sorted(unknown))}")
    endpoint = raw.get("otlp_endpoint")
    if endpoint is not None:
        endpoint = str(endpoint)
        scheme, sep, rest = endpoint.partition("://")
        if not sep or scheme not in ("http", "https"):
            raise ConfigError(f"tracing.otlp_endpoint: expected http://host:port (plain) or https://host:port "
                              f"(TLS), got {endpoint!r}")
        _split_host_port(rest.rstrip("/"), "tracing.otlp_endpoint")
    name = raw.get("service_name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ConfigError("tracing.service_name: a non-empty string")
    return endpoint, name


def load_config(path: Path) -> AgentConfig:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    return parse_config(raw, base_dir=path.parent)
