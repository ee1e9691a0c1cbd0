"""`make run`: a control plane and one enrolled agent on embedded defaults.

Starts, under var/demo/:
- a control plane: operator API on 127.0.0.1:8443, agent listener on
  127.0.0.1:8444, enrollment on 127.0.0.1:8445, the web console on
  https://127.0.0.1:8446/, state in var/demo/control-plane;
- a small HTTP app on 127.0.0.1:8480 (the `demo-app` profile's target);
- one agent in group `demo` with the profiles `demo-db` (SQLite with sample
  tables), `demo-files` (a sample folder) and `demo-app`.

It writes the CA to var/demo/ca.pem and an admin token to var/demo/admin.token,
prints grpcurl commands that work when pasted and how to log in to the console,
and stops everything on Ctrl-C.
Running it again reuses the state (the same CA, token and agent).

`--replicas 3` runs PostgreSQL and three control-plane replicas instead (`tools.demo.replicas`).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import grpc
import yaml

from onprem.v1 import agents_pb2, agents_pb2_grpc
from tools.demo.processes import stop_all, stop_on_signals, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# Set from the command line in main(); the defaults are what the README promises.
DEMO = ROOT / "var" / "demo"
OPERATOR, AGENT, ENROLL, CONSOLE, APP_PORT = "127.0.0.1:8443", "127.0.0.1:8444", "127.0.0.1:8445", "127.0.0.1:8446", 8480


def configure(directory: Path, base_port: int, app_port: int) -> None:
    global DEMO, OPERATOR, AGENT, ENROLL, CONSOLE, APP_PORT
    DEMO = directory.resolve()
    OPERATOR, AGENT, ENROLL, CONSOLE = (f"127.0.0.1:{base_port + i}" for i in range(4))
    APP_PORT = app_port


def shown(path: Path) -> str:
    """A path as the printed commands use it: relative to the repository when inside it."""
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def make_sample_database(path: Path) -> None:
    if path.exists():
        return
    with sqlite3.connect(path) as db:
        db.executescript("""
            CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, country TEXT, since DATE);
            CREATE TABLE orders (
                id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(id),
                total NUMERIC NOT NULL, status TEXT NOT NULL, created_at TIMESTAMP NOT NULL);
            INSERT INTO customers VALUES
                (1, 'Acme GmbH', 'DE', '2019-03-01'), (2, 'Globex Ltd', 'GB', '2020-11-15'),
                (3, 'Initech', 'US', '2021-06-30'), (4, 'Umbrella SA', 'FR', '2023-01-09');
            INSERT INTO orders VALUES
                (1, 1, 1299.00, 'shipped', '2026-10-01 09:12:00'), (2, 2, 87.50, 'open', '2026-10-03 14:40:00'),
                (3, 3, 410.20, 'open', '2026-10-07 08:05:00'), (4, 1, 15.99, 'cancelled', '2026-10-09 17:30:00'),
                (5, 4, 2200.00, 'shipped', '2026-10-12 11:00:00');
        """)


def make_idempotency_table(path: Path) -> None:
    """The table where demo-db records keyed writes (also in a demo database made before it existed)."""
    from onprem.agent.handlers.database.idempotency import ddl

    script = ddl("onprem_idempotency", "sqlite").replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS")
    with sqlite3.connect(path) as db:
        db.executescript(script.replace("CREATE INDEX", "CREATE INDEX IF NOT EXISTS"))


def make_sample_folder(path: Path) -> None:
    if path.exists():
        return
    (path / "reports").mkdir(parents=True)
    (path / "incoming").mkdir()
    (path / "README.txt").write_text("Files the demo agent exposes as the demo-files profile.\n")
    (path / "reports" / "2026-10.csv").write_text(
        "customer,orders,total\nAcme GmbH,2,1314.99\nGlobex Ltd,1,87.50\nInitech,1,410.20\nUmbrella SA,1,2200.00\n"
    )


def wait_for_agent(token: str, ca: bytes, timeout: float = 30) -> agents_pb2.Agent:
    deadline = time.monotonic() + timeout
    with grpc.secure_channel(OPERATOR, grpc.ssl_channel_credentials(ca)) as channel:
        stub = agents_pb2_grpc.AgentServiceStub(channel)
        while time.monotonic() < deadline:
            agents = stub.ListAgents(agents_pb2.ListAgentsRequest(group="demo"),
                                     metadata=(("authorization", f"Bearer {token}"),)).agents
            active = [a for a in agents if a.state == agents_pb2.AGENT_STATE_ACTIVE]
            if active:
                return active[0]
            time.sleep(0.2)
    sys.exit(f"demo: the agent did not connect within {timeout:.0f} s; see {DEMO}/agent.log")


def commands() -> str:
    ca, token = shown(DEMO / "ca.pem"), shown(DEMO / "admin.token")
    grpcurl = shown(BIN / "grpcurl")
    g = f"{grpcurl} -cacert {ca} -H \"authorization: Bearer $(cat {token})\""
    return f"""
Try these (from {ROOT}):

  # what the control plane serves (server reflection)
  {g} {OPERATOR} list
  {g} {OPERATOR} describe onprem.v1.DatabaseService

  # health
  {grpcurl} -cacert {ca} {OPERATOR} grpc.health.v1.Health/Check

  # agents and groups
  {g} {OPERATOR} onprem.v1.AgentService/ListAgents
  {g} {OPERATOR} onprem.v1.AgentService/ListGroups

  # a query, streamed from the agent's SQLite database
  {g} -d '{{"group": "demo", "profile": "demo-db", "sql": "SELECT id, name, country FROM customers WHERE id <= :max", "parameters": {{"max": {{"int64Value": "3"}}}}}}' {OPERATOR} onprem.v1.DatabaseService/Query

  # files
  {g} -d '{{"group": "demo", "profile": "demo-files", "path": "", "recursive": true}}' {OPERATOR} onprem.v1.FileService/List
  {g} -d '{{"group": "demo", "profile": "demo-files", "path": "reports/2026-10.csv"}}' {OPERATOR} onprem.v1.FileService/Read

  # an on-prem HTTP app; the agent adds the API key, the caller never sees it
  {g} -d '{{"head": {{"group": "demo", "profile": "demo-app", "method": "GET", "path": "orders"}}}}' {OPERATOR} onprem.v1.AppService/Call

The web console: https://{CONSOLE}/
  Log in with the admin token (paste the output of: cat {token}). The browser must trust the demo CA
  ({ca}: import it as an authority, or accept the warning once); the token stays on the server.

Press Ctrl-C to stop everything.
"""


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.demo", description="Run the onprem demo.")
    parser.add_argument("--dir", type=Path, default=DEMO, help="where the demo keeps its state (var/demo)")
    parser.add_argument("--base-port", type=int, default=8443,
                        help="operator API port; the agent and enrollment listeners and the console take the next three")
    parser.add_argument("--app-port", type=int, default=APP_PORT, help="port of the demo HTTP app")
    parser.add_argument("--replicas", type=int, default=1,
                        help="run PostgreSQL and this many control-plane replicas (2 to 5) with one agent holding a "
                             "stream to each, instead of the embedded demo (state in var/demo-ha)")
    args = parser.parse_args()
    if args.replicas > 1:
        if args.replicas > 5:
            parser.error("--replicas: at most 5")
        from tools.demo import replicas

        directory = args.dir if args.dir != DEMO else ROOT / "var" / "demo-ha"
        replicas.run(directory.resolve(), args.base_port, args.replicas)
        return
    configure(args.dir, args.base_port, args.app_port)
    DEMO.mkdir(parents=True, exist_ok=True)
    cp_state, agent_home = DEMO / "control-plane", DEMO / "agent"
    make_sample_database(DEMO / "demo.db")
    make_idempotency_table(DEMO / "demo.db")
    make_sample_folder(DEMO / "files")
    key_file = DEMO / "app.key"
    if not key_file.exists():
        key_file.write_text(secrets.token_urlsafe(24))
    env = {**os.environ, "DEMO_APP_KEY": key_file.read_text().strip()}
    procs: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(DEMO / log, "ab") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        procs.append(proc)
        return proc

    def cp_cli(*args: str) -> str:
        out = subprocess.run([str(BIN / "onprem-control-plane"), args[0], "--state-dir", str(cp_state), *args[1:]],
                             check=True, capture_output=True, text=True)
        return out.stdout.strip()

    stop_on_signals()
    try:
        app = start([sys.executable, "-m", "tools.demo.http_app", "--port", str(APP_PORT)], "http-app.log")
        wait_for_port(f"127.0.0.1:{APP_PORT}", app, "demo HTTP app", DEMO)
        cp = start([str(BIN / "onprem-control-plane"), "serve", "--state-dir", str(cp_state),
                    "--operator-listen", OPERATOR, "--agent-listen", AGENT, "--enroll-listen", ENROLL,
                    "--console-listen", CONSOLE, "--grace-period", "5"], "control-plane.log")
        wait_for_port(OPERATOR, cp, "control plane", DEMO)
        wait_for_port(CONSOLE, cp, "control plane's console", DEMO)
        shutil.copyfile(cp_state / "ca" / "ca.pem", DEMO / "ca.pem")
        token_file = DEMO / "admin.token"
        if not token_file.exists():
            # The demo's bootstrap token: it never expires, so that the demo works when started again later.
            cp_cli("create-admin-token", "--name", "demo-admin", "--no-expiry", "--output", str(token_file))
        config = {
            "control_plane": {"address": AGENT, "enroll_address": ENROLL, "ca_file": str(DEMO / "ca.pem")},
            "identity_dir": str(agent_home / "identity"),
            "name": "demo-agent",
            "profiles": {
                "databases": {"demo-db": {"url": f"sqlite:///{DEMO / 'demo.db'}", "read_only": False,
                                          "idempotency_table": "onprem_idempotency"}},
                "folders": {"demo-files": {"root": str(DEMO / "files"), "read_only": False}},
                "apps": {"demo-app": {"base_url": f"http://127.0.0.1:{APP_PORT}/api/",
                                      "headers_from_env": {"X-Api-Key": "DEMO_APP_KEY"}}},
            },
        }
        agent_home.mkdir(parents=True, exist_ok=True)
        config_file = agent_home / "agent.yaml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        if not (agent_home / "identity" / "agent.json").exists():
            enrollment = cp_cli("create-enrollment-token", "--group", "demo", "--description", "make run")
            subprocess.run([str(BIN / "onprem-agent"), "enroll", "--config", str(config_file), "--token", enrollment],
                           check=True, env=env)
        start([str(BIN / "onprem-agent"), "run", "--config", str(config_file)], "agent.log")
        agent = wait_for_agent(token_file.read_text().strip(), (DEMO / "ca.pem").read_bytes())
        print(f"\nonprem demo is up: control plane on {OPERATOR}, console on https://{CONSOLE}/, agent {agent.name} "
              f"({agent.agent_id}) ACTIVE in group demo with profiles demo-db, demo-files, demo-app.\n"
              f"CA: {shown(DEMO / 'ca.pem')}   admin token: {shown(DEMO / 'admin.token')}   "
              f"logs: {shown(DEMO)}/*.log")
        print(commands(), flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        sys.exit(f"demo: a process exited unexpectedly; see {DEMO}/*.log")
    except KeyboardInterrupt:
        print("\nstopping…", flush=True)
    finally:
        stop_all(procs)


if __name__ == "__main__":
    main()
