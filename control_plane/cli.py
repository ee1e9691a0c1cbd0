"""`onprem-control-plane`: serve, and manage tokens on the control plane's host.

    onprem-control-plane serve [--state-dir DIR] [--operator-listen ADDR] [--console-listen ADDR] ...
    onprem-control-plane migrate [--database-url URL]
    onprem-control-plane create-admin-token [--name NAME] [--ttl 90d | --no-expiry] [--output FILE]
    onprem-control-plane create-token --name NAME --role operator --groups a,b [--ttl 30d]
    onprem-control-plane list-tokens | revoke-token ID | token-settings [--default-ttl 90d]
    onprem-control-plane create-enrollment-token --group GROUP [--ttl SECONDS]
    onprem-control-plane list-enrollment-tokens | revoke-enrollment-token ID

Token commands (`cli_tokens`) talk to the store directly (they run on the
control plane's host, before any operator can authenticate) and print the
token on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import sys
from pathlib import Path

from onprem.control_plane import __version__, cli_tokens
from onprem.control_plane.api.whole_results import DEFAULT_BUDGET_BYTES
from onprem.control_plane.audit_retention import DEFAULT_RETENTION_DAYS
from onprem.control_plane.console.context import ConsoleSettings
from onprem.control_plane.console.listener import split_address
from onprem.control_plane.core import Settings
from onprem.control_plane.private_state import prepare_state_dir
from onprem.control_plane.server import ControlPlaneServer, ServerConfig, open_control_plane, open_store
from onprem.control_plane.store import DEFAULT_DB_FILENAME, Store, StoreError, current_revision, default_url
from onprem.tunnel import logs, systemd, tracing
from onprem.tunnel.protocol import Limits
from onprem.tunnel.version import version_line


def _state_dir(value: str) -> Path:
    return Path(value).expanduser().resolve()


def _positive(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {value}")
    return number


def _retention_days(value: str) -> float:
    number = float(value)
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 (keep every row) or more, got {value}")
    return number


def _console_address(value: str) -> str:
    try:
        split_address(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=_state_dir,
                        default=_state_dir(os.environ.get("ONPREM_STATE_DIR", "/var/lib/onprem-control-plane")),
                        help="where the CA, the server certificate and the SQLite store live")
    parser.add_argument("--database-url", default=os.environ.get("ONPREM_DATABASE_URL"),
                        help="a SQLAlchemy URL for the store (default: SQLite in the state dir)")


def _store(args: argparse.Namespace) -> Store:
    return open_store(args.state_dir, args.database_url)


def _serve(args: argparse.Namespace) -> int:
    settings = Settings(
        agent_cert_validity=dt.timedelta(days=args.agent_cert_days),
        limits=Limits(heartbeat_interval=dt.timedelta(seconds=args.heartbeat_interval)),
        replica_heartbeat=args.replica_heartbeat,
        change_check_interval=args.change_check_interval,
        whole_results_budget_bytes=int(args.whole_results_mib * 1024 * 1024),
    )
    config = ServerConfig(
        state_dir=args.state_dir,
        operator_listen=args.operator_listen,
        agent_listen=args.agent_listen,
        enroll_listen=args.enroll_listen,
        database_url=args.database_url,
        hostnames=tuple(args.hostname or ("localhost", "127.0.0.1")),
        grace_period=args.grace_period,
        metrics_listen=args.metrics_listen,
        settings=settings,
        replica_id=args.replica_id,
        advertise_agent_address=args.advertise_agent_address or "",
        advertise_operator_address=args.advertise_operator_address or "",
        console_listen=args.console_listen,
        console=ConsoleSettings(session_ttl=dt.timedelta(hours=args.console_session_hours),
                                refresh_seconds=args.console_refresh_seconds),
        audit_retention=dt.timedelta(days=args.audit_retention_days) if args.audit_retention_days else None,
    )

    # Before the server starts: spans of the very first calls are exported too.
    traces = tracing.configure("onprem-control-plane", endpoint=args.otlp_endpoint)

    async def run() -> None:
        cp = open_control_plane(config)
        server = ControlPlaneServer(config, cp)
        stop = server.stop_on_signals()
        watchdog: asyncio.Task[None] | None = None
        try:
            await server.start()
            console = f", console https://{config.console_listen}/" if config.console_listen else ""
            print(f"onprem control plane: operator {config.operator_listen}, agents {config.agent_listen}, "
                  f"enrollment {config.enroll_listen}{console}; CA {config.state_dir / 'ca' / 'ca.pem'}", flush=True)
            # Under systemd (Type=notify) the unit is started only once every listener is open, and a loop
            # that stops turning misses its watchdog pings and gets the service restarted.
            interval = systemd.watchdog_interval()
            if interval:
                watchdog = asyncio.get_running_loop().create_task(systemd.keep_watchdog_fed(interval))
            systemd.notify("READY=1", f"STATUS=serving: operator {config.operator_listen}, "
                                      f"agents {config.agent_listen}, enrollment {config.enroll_listen}")
            await stop.wait()
            systemd.notify("STOPPING=1", "STATUS=draining agents and in-flight requests")
            await server.serve_until_signal(stop)
        finally:
            if watchdog is not None:
                watchdog.cancel()
                await asyncio.gather(watchdog, return_exceptions=True)
            cp.close()

    try:
        asyncio.run(run())
    finally:
        traces.shutdown()  # the spans still queued, of the last calls
    return 0


def _migrate(args: argparse.Namespace) -> int:
    """Upgrade the store's schema to this version's (once, before the replicas of a new version start)."""
    prepare_state_dir(args.state_dir, sqlite_file=None if args.database_url else args.state_dir / DEFAULT_DB_FILENAME)
    url = args.database_url or default_url(args.state_dir)
    before = current_revision(url)
    with Store(url) as store:
        after = store.create_schema(upgrade=True, version=__version__)
    if before == after:
        print(f"the store is at schema revision {after} already: nothing to do")
    else:
        print(f"the store was at schema revision {before or 'none (new)'}; it is at {after} now")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onprem-control-plane", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=version_line("onprem-control-plane"))
    parser.add_argument("--log-level", default=os.environ.get("ONPREM_LOG_LEVEL", "INFO"))
    parser.add_argument("--log-format", choices=["text", "json"], default=os.environ.get("ONPREM_LOG_FORMAT", "text"),
                        help="one line per event, as text or as JSON")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the control plane")
    _common(serve)
    serve.add_argument("--operator-listen", default="127.0.0.1:8443")
    serve.add_argument("--agent-listen", default="127.0.0.1:8444")
    serve.add_argument("--enroll-listen", default="127.0.0.1:8445")
    serve.add_argument("--hostname", action="append",
                       help="a name or IP the server certificate must carry (repeatable)")
    serve.add_argument("--grace-period", type=float, default=30.0)
    serve.add_argument("--metrics-listen", help="host:port to serve Prometheus metrics on (default: none)")
    serve.add_argument("--console-listen", type=_console_address, default=os.environ.get("ONPREM_CONSOLE_LISTEN"),
                       help="host:port to serve the web console on, over HTTPS with the control plane's certificate "
                            "(e.g. 127.0.0.1:8446; default: none). Operators log in with an operator token and see "
                            "the groups it may use (docs/console.md)")
    serve.add_argument("--console-session-hours", type=_positive, default=8.0,
                       help="how long a console login lasts, at most (never longer than its token)")
    serve.add_argument("--console-refresh-seconds", type=_positive, default=5.0,
                       help="seconds between refreshes of the console's pages in the browser")
    serve.add_argument("--audit-retention-days", type=_retention_days,
                       default=_retention_days(os.environ.get("ONPREM_AUDIT_RETENTION_DAYS", str(DEFAULT_RETENTION_DAYS))),
                       help=f"delete audit rows older than this many days, in the background, hourly "
                            f"(default {DEFAULT_RETENTION_DAYS}; 0 keeps every row; $ONPREM_AUDIT_RETENTION_DAYS)")
    serve.add_argument("--whole-results-mib", type=_positive, default=DEFAULT_BUDGET_BYTES / (1024 * 1024),
                       help="memory that ExecuteQuery calls may hold at once in whole results (each at most 4 MiB); "
                            f"past it they are RESOURCE_EXHAUSTED (default {DEFAULT_BUDGET_BYTES // (1024 * 1024)})")
    serve.add_argument("--agent-cert-days", type=float, default=30.0)
    serve.add_argument("--heartbeat-interval", type=float, default=10.0,
                       help="seconds between pings on a quiet agent stream; 3 missed end it")
    serve.add_argument("--otlp-endpoint", default=None,
                       help="export OpenTelemetry spans over OTLP/gRPC to this collector, e.g. "
                            "http://127.0.0.1:4317 (default: $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or "
                            "$OTEL_EXPORTER_OTLP_ENDPOINT; unset: no spans are made); the service name is "
                            "$OTEL_SERVICE_NAME or onprem-control-plane")
    serve.set_defaults(func=_serve)

    serve.add_argument("--replica-id", default=os.environ.get("ONPREM_REPLICA_ID"),
                       help="this replica's id among those sharing the store (default: one made on first start "
                            "and kept in the state dir)")
    serve.add_argument("--advertise-agent-address", default=os.environ.get("ONPREM_ADVERTISE_AGENT_ADDRESS"),
                       help="host:port agents dial to reach this replica (default: none; agents keep dialing "
                            "their configured address, e.g. a load balancer, until they hold every replica)")
    serve.add_argument("--advertise-operator-address", default=os.environ.get("ONPREM_ADVERTISE_OPERATOR_ADDRESS"),
                       help="host:port operators dial to reach this replica (shown in the registry)")

    serve.add_argument("--replica-heartbeat", type=float, default=2.0,
                       help="seconds between this replica's heartbeats in the store; 3 missed and it is gone")
    serve.add_argument("--change-check-interval", type=float, default=2.0,
                       help="seconds between checks of this replica's agents against the store, for revocations "
                            "and drains whose notification was missed")

    migrate = sub.add_parser("migrate", help="upgrade the store's schema to this version's (PostgreSQL: once, "
                                             "before starting the new version's replicas)")
    _common(migrate)
    migrate.set_defaults(func=_migrate)

    cli_tokens.add_commands(sub, _common, _store)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    try:
        return int(args.func(args))
    except ValueError as exc:
        print(f"onprem-control-plane: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"onprem-control-plane: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
