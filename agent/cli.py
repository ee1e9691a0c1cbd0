"""`onprem-agent`: enroll once, then run as a service.

    onprem-agent enroll --config agent.yaml --token onpe_...
    onprem-agent run --config agent.yaml
    onprem-agent check-config --config agent.yaml
    onprem-agent doctor --config agent.yaml
    onprem-agent test-profile NAME --config agent.yaml
    onprem-agent create-idempotency-table --profile NAME --config agent.yaml [--ddl]
    kill -HUP <pid>      reload the profiles without dropping the stream
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import grpc
import sqlalchemy.exc

from onprem.agent import failpoints, metrics
from onprem.agent.config import AgentConfig, load_config
from onprem.agent.dispatcher import Dispatcher
from onprem.agent.handlers.database import idempotency
from onprem.agent.handlers.database.engine import ProfileRuntime
from onprem.agent.handlers.database.errors import first_lines, scrub
from onprem.agent.handlers.table import build_handlers
from onprem.agent.identity import (
    Identity,
    IdentityError,
    certificate_checks,
    load_identity,
    make_key_and_csr,
    save_identity,
)
from onprem.agent.profile_check import mark, run_test_profile
from onprem.agent.profiles import ConfigError
from onprem.agent.tunnel_client import TunnelClient, channel_credentials, channel_options
from onprem.tunnel import kinds, logs, systemd, tracing
from onprem.tunnel.version import version_line
from onprem.v1 import enrollment_pb2, enrollment_pb2_grpc

log = logging.getLogger("onprem.agent")

DEFAULT_CONFIG = os.environ.get("ONPREM_AGENT_CONFIG", "/etc/onprem-agent/agent.yaml")


async def enroll(config: AgentConfig, token: str, name: str) -> Identity:
    key_pem, csr_pem = make_key_and_csr(name)
    async with grpc.aio.secure_channel(
        config.control_plane.enroll_address, channel_credentials(config, None), options=channel_options(config)
    ) as channel:
        response = await enrollment_pb2_grpc.EnrollmentStub(channel).Enroll(
            enrollment_pb2.EnrollRequest(token=token, csr_pem=csr_pem.decode(), name=name,
                                         hostname=socket.gethostname()),
            timeout=30,
        )
    identity = Identity(response.agent_id, response.group, key_pem, response.certificate_pem.encode())
    save_identity(config.identity_dir, identity)
    return identity


async def run(config_path: Path, config: AgentConfig, identity: Identity) -> None:
    dispatcher = Dispatcher(build_handlers(config.profiles))
    client = TunnelClient(config, identity, dispatcher)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_stop() -> None:
        systemd.notify("STOPPING=1", "STATUS=draining in-flight requests")
        stop.set()

    def on_reload() -> None:
        systemd.notify("RELOADING=1")
        try:
            fresh = load_config(config_path)
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
        else:
            client.reload(fresh, build_handlers(fresh.profiles))
        systemd.notify("READY=1", f"STATUS={client.status_line()}")

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    loop.add_signal_handler(signal.SIGHUP, on_reload)
    log.info("agent %s (group %s) starting; control plane %s; %d profiles",
             identity.agent_id, identity.group, config.control_plane.address, len(dispatcher.profiles()))
    if config.metrics_listen:
        metrics.serve(config.metrics_listen)
    interval = systemd.watchdog_interval()
    watchdog = loop.create_task(systemd.keep_watchdog_fed(interval)) if interval else None
    systemd.notify("READY=1", f"STATUS=serving {len(dispatcher.profiles())} profiles")
    try:
        await client.run(stop)
    finally:
        if watchdog is not None:
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
        log.debug("shutdown: closing handlers")
        await dispatcher.aclose()
    log.info("agent stopped")


async def doctor(config: AgentConfig) -> int:
    """Check what the agent needs, print one line per check, return 0 when all pass."""
    failures = 0

    def report(ok: bool, name: str, message: str, sign: str | None = None) -> None:
        nonlocal failures
        failures += not ok
        print(f"{sign or ('✓' if ok else '✗')} {name}: {message}", flush=True)

    report(True, "config", f"valid; control plane {config.control_plane.address}")
    try:
        identity = load_identity(config.identity_dir)
    except IdentityError as exc:
        report(False, "identity", str(exc))
        return 1
    for ok, name, message in certificate_checks(identity, config.control_plane.ca_file):
        report(ok, name, message)
    try:
        async with grpc.aio.secure_channel(
            config.control_plane.address, channel_credentials(config, identity), options=channel_options(config)
        ) as channel:
            async with asyncio.timeout(10):
                await channel.channel_ready()
        report(True, "control plane", f"{config.control_plane.address} accepted the agent's certificate (mTLS)")
    except (TimeoutError, grpc.aio.AioRpcError) as exc:
        report(False, "control plane", f"cannot reach {config.control_plane.address} over mTLS within 10 s"
               f"{': ' + str(exc) if str(exc) else ''} (firewall, proxy, address, or a certificate it refuses)")
    dispatcher = Dispatcher(build_handlers(config.profiles))
    try:
        for health in await dispatcher.check_all():
            kind = kinds.name_of(health.kind)
            for check in health.checks:
                # A warning ("!") is printed but passes: e.g. a read-only profile whose role could write.
                report(check.ok, f"{kind} profile {health.profile}: {check.name}", check.message, mark(check))
    finally:
        await dispatcher.aclose()
    return 1 if failures else 0


def _load(path: str) -> AgentConfig:
    return load_config(Path(path))


def _cmd_enroll(args: argparse.Namespace) -> int:
    config = _load(args.config)
    token = args.token or os.environ.get("ONPREM_ENROLLMENT_TOKEN", "")
    if not token:
        print("onprem-agent enroll: pass --token or set ONPREM_ENROLLMENT_TOKEN", file=sys.stderr)
        return 2
    name = args.name or config.name or socket.gethostname()
    try:
        identity = asyncio.run(enroll(config, token, name))
    except grpc.aio.AioRpcError as exc:
        print(f"onprem-agent enroll: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(f"enrolled as {identity.agent_id} in group {identity.group}; "
          f"certificate valid until {identity.not_after.isoformat()}; identity in {config.identity_dir}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        failpoints.load()
    except ValueError as exc:
        print(f"onprem-agent: {exc}", file=sys.stderr)
        return 2
    config = _load(args.config)
    identity = load_identity(config.identity_dir)
    traces = tracing.configure(config.service_name or "onprem-agent", endpoint=config.otlp_endpoint,
                               attributes={"service.instance.id": identity.agent_id, "onprem.group": identity.group})
    try:
        asyncio.run(run(Path(args.config), config, identity))
    finally:
        traces.shutdown()  # the spans still queued, of the last requests
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    return asyncio.run(doctor(_load(args.config)))


def _cmd_test_profile(args: argparse.Namespace) -> int:
    return asyncio.run(run_test_profile(Path(args.config), args.name))


def _cmd_create_idempotency_table(args: argparse.Namespace) -> int:
    config = _load(args.config)
    profile = config.profiles.databases.get(args.profile)
    if profile is None:
        print(f"onprem-agent: no database profile named {args.profile!r} in {args.config}", file=sys.stderr)
        return 2
    if profile.idempotency_table is None:
        print(f"onprem-agent: database profile {args.profile!r} names no idempotency_table", file=sys.stderr)
        return 2
    if args.ddl:
        if profile.dialect not in idempotency.DDL_DIALECTS:
            print(f"onprem-agent: no DDL for dialect {profile.dialect!r}; see docs/operators.md", file=sys.stderr)
            return 2
        print(idempotency.ddl(profile.idempotency_table, profile.dialect), end="")
        return 0
    if profile.read_only:
        print(f"onprem-agent: database profile {args.profile!r} is read_only, and keeps no idempotency records",
              file=sys.stderr)
        return 2
    runtime = ProfileRuntime(profile)
    try:
        table = runtime.idempotency
        assert table is not None
        with runtime.engine().begin() as conn:
            created = table.create(conn)
    except sqlalchemy.exc.SQLAlchemyError as exc:
        print(f"onprem-agent: creating {profile.idempotency_table!r} failed: "
              f"{scrub(first_lines(str(exc)), runtime.secrets)}", file=sys.stderr)
        return 1
    finally:
        runtime.close()
    print(f"idempotency table {profile.idempotency_table} {'created' if created else 'exists already'} "
          f"in database profile {profile.name}")
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    p = config.profiles
    print(f"config OK: control plane {config.control_plane.address}; "
          f"{len(p.databases)} database, {len(p.folders)} folder, {len(p.apps)} app profiles")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onprem-agent", description="The onprem agent.")
    parser.add_argument("--version", action="version", version=version_line("onprem-agent"))
    parser.add_argument("--log-level", default=os.environ.get("ONPREM_LOG_LEVEL", "INFO"))
    parser.add_argument("--log-format", choices=["text", "json"], default=os.environ.get("ONPREM_LOG_FORMAT", "text"),
                        help="one line per event, as text or as JSON")
    sub = parser.add_subparsers(dest="command", required=True)
    enroll_p = sub.add_parser("enroll", help="make a key pair and enroll with a token")
    enroll_p.add_argument("--config", default=DEFAULT_CONFIG)
    enroll_p.add_argument("--token", help="the enrollment token (or ONPREM_ENROLLMENT_TOKEN)")
    enroll_p.add_argument("--name", help="the agent's name (default: the config's name, or the host name)")
    enroll_p.set_defaults(func=_cmd_enroll)
    run_p = sub.add_parser("run", help="hold the tunnel and serve requests")
    run_p.add_argument("--config", default=DEFAULT_CONFIG)
    run_p.set_defaults(func=_cmd_run)
    check = sub.add_parser("check-config", help="validate the config and exit")
    check.add_argument("--config", default=DEFAULT_CONFIG)
    check.set_defaults(func=_cmd_check_config)
    doctor_p = sub.add_parser("doctor", help="check the control plane, the certificate and every profile")
    doctor_p.add_argument("--config", default=DEFAULT_CONFIG)
    doctor_p.set_defaults(func=_cmd_doctor)
    test_p = sub.add_parser("test-profile", help="check one database profile: host, credentials, database, "
                                                 "dialect, read access")
    test_p.add_argument("name", help="the database profile's name")
    test_p.add_argument("--config", default=DEFAULT_CONFIG)
    test_p.set_defaults(func=_cmd_test_profile)
    table_p = sub.add_parser("create-idempotency-table",
                             help="create the table where a database profile records keyed writes")
    table_p.add_argument("--profile", required=True, help="the database profile (it names idempotency_table)")
    table_p.add_argument("--config", default=DEFAULT_CONFIG)
    table_p.add_argument("--ddl", action="store_true", help="print the CREATE statements instead of running them")
    table_p.set_defaults(func=_cmd_create_idempotency_table)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    try:
        return int(args.func(args))
    except (ConfigError, IdentityError) as exc:
        print(f"onprem-agent: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
