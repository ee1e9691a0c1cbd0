"""`onprem-control-plane`: serve, and make the first tokens.

    onprem-control-plane serve [--state-dir DIR] [--operator-listen ADDR] ...
    onprem-control-plane create-admin-token [--name NAME]
    onprem-control-plane create-token --name NAME --role operator --groups a,b
    onprem-control-plane create-enrollment-token --group GROUP [--ttl SECONDS]

Token commands talk to the store directly (they run on the control plane's
host, before any operator can authenticate) and print the token on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import sys
from pathlib import Path

from control_plane.app import Settings
from control_plane.server import ControlPlaneServer, ServerConfig, open_control_plane
from control_plane.store import Store, validate_group_name
from tunnel import logs
from tunnel.protocol import Limits


def _state_dir(value: str) -> Path:
    return Path(value).expanduser().resolve()


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=_state_dir,
                        default=_state_dir(os.environ.get("ONPREM_STATE_DIR", "/var/lib/onprem-control-plane")),
                        help="where the CA, the server certificate and the SQLite store live")
    parser.add_argument("--database-url", default=os.environ.get("ONPREM_DATABASE_URL"),
                        help="a SQLAlchemy URL for the store (default: SQLite in the state dir)")


def _store(args: argparse.Namespace) -> Store:
    url = args.database_url or f"sqlite:///{args.state_dir / 'control-plane.db'}"
    args.state_dir.mkdir(parents=True, exist_ok=True)
    store = Store(url)
    store.create_schema()
    return store


def _serve(args: argparse.Namespace) -> int:
    settings = Settings(
        agent_cert_validity=dt.timedelta(days=args.agent_cert_days),
        limits=Limits(heartbeat_interval=dt.timedelta(seconds=args.heartbeat_interval)),
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
    )

    async def run() -> None:
        cp = open_control_plane(config)
        server = ControlPlaneServer(config, cp)
        try:
            await server.start()
            print(f"onprem control plane: operator {config.operator_listen}, agents {config.agent_listen}, "
                  f"enrollment {config.enroll_listen}; CA {config.state_dir / 'ca' / 'ca.pem'}", flush=True)
            await server.serve_until_signal()
        finally:
            cp.close()

    asyncio.run(run())
    return 0


def _create_admin_token(args: argparse.Namespace) -> int:
    with _store(args) as store:
        token, _ = store.create_api_token(args.name, "admin", ["*"])
    print(token)
    return 0


def _create_token(args: argparse.Namespace) -> int:
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    for g in groups:
        if g != "*":
            validate_group_name(g)
    with _store(args) as store:
        token, _ = store.create_api_token(args.name, args.role, groups)
    print(token)
    return 0


def _create_enrollment_token(args: argparse.Namespace) -> int:
    with _store(args) as store:
        token, row = store.create_enrollment_token(args.group, dt.timedelta(seconds=args.ttl), args.description)
    print(token)
    print(f"valid until {row.expires_at.isoformat()} for group {row.group_name}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onprem-control-plane", description=__doc__.split("\n")[0])
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
    serve.add_argument("--agent-cert-days", type=float, default=30.0)
    serve.add_argument("--heartbeat-interval", type=float, default=10.0,
                       help="seconds between pings on a quiet agent stream; 3 missed end it")
    serve.set_defaults(func=_serve)

    admin = sub.add_parser("create-admin-token", help="create an admin token for every group")
    _common(admin)
    admin.add_argument("--name", default="admin")
    admin.set_defaults(func=_create_admin_token)

    token = sub.add_parser("create-token", help="create an operator or admin token")
    _common(token)
    token.add_argument("--name", required=True)
    token.add_argument("--role", choices=["operator", "admin"], default="operator")
    token.add_argument("--groups", required=True, help="comma-separated groups, or * for all")
    token.set_defaults(func=_create_token)

    enroll = sub.add_parser("create-enrollment-token", help="create a single-use agent enrollment token")
    _common(enroll)
    enroll.add_argument("--group", required=True)
    enroll.add_argument("--ttl", type=float, default=3600, help="seconds the token stays valid")
    enroll.add_argument("--description", default="")
    enroll.set_defaults(func=_create_enrollment_token)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    try:
        return int(args.func(args))
    except ValueError as exc:
        print(f"onprem-control-plane: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
