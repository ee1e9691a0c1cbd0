"""`python -m tools.demo --replicas 3`: PostgreSQL, three control-plane replicas and one agent, locally.

Under the demo folder (var/demo-ha by default):
- PostgreSQL in pg/, on 127.0.0.1:<base+30>, database `onprem` (kept between runs);
- replicas r1, r2, r3 in replica-1/… : operator API on <base>, <base+10>, <base+20>, agents on the
  next port of each, enrollment on the one after; one CA, made by r1 and copied to the others;
- one agent in group `demo` (a SQLite profile `demo-db`) that holds a stream to every replica.

It prints commands to try (any replica answers for any group; kill one and the others go on) and
stops everything on Ctrl-C.
"""

from __future__ import annotations

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
from tools.postgres import running_postgres

BIN = Path(sys.executable).parent


def _cli(state: Path, url: str, *args: str) -> str:
    out = subprocess.run([str(BIN / "onprem-control-plane"), args[0], "--state-dir", str(state), "--database-url",
                          url, *args[1:]], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def _wait_for_streams(operator: str, ca: bytes, token: str, count: int, timeout: float = 60) -> agents_pb2.Agent:
    deadline = time.monotonic() + timeout
    with grpc.secure_channel(operator, grpc.ssl_channel_credentials(ca)) as channel:
        stub = agents_pb2_grpc.AgentServiceStub(channel)
        while time.monotonic() < deadline:
            agents = stub.ListAgents(agents_pb2.ListAgentsRequest(group="demo"),
                                     metadata=(("authorization", f"Bearer {token}"),)).agents
            full = [a for a in agents if a.state == agents_pb2.AGENT_STATE_ACTIVE and len(a.replica_ids) >= count]
            if full:
                return full[0]
            time.sleep(0.3)
    sys.exit(f"demo: the agent did not reach {count} replicas within {timeout:.0f} s; see the logs")


def run(directory: Path, base_port: int, count: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(directory / log, "ab") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    stop_on_signals()
    db = directory / "demo.db"
    if not db.exists():
        with sqlite3.connect(db) as conn:
            conn.executescript("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT);"
                               "INSERT INTO customers (name) VALUES ('Acme'), ('Globex'), ('Initech');")
    try:
        with running_postgres(directory / "pg", port=base_port + 30, database="onprem") as pg:
            url = pg.url()
            ports = [(base_port + 10 * i, base_port + 10 * i + 1, base_port + 10 * i + 2) for i in range(count)]
            states = [directory / f"replica-{i + 1}" for i in range(count)]
            for i, (state, (operator, agent_port, enroll)) in enumerate(zip(states, ports, strict=True)):
                if i > 0 and not (state / "ca" / "ca.pem").exists():
                    # One CA for all, provisioned as files (docs/ha.md): the key never goes into the database.
                    (state / "ca").mkdir(parents=True, exist_ok=True)
                    for name in ("ca.pem", "ca.key"):
                        shutil.copy2(states[0] / "ca" / name, state / "ca" / name)
                proc = start([str(BIN / "onprem-control-plane"), "serve", "--state-dir", str(state),
                              "--database-url", url, "--replica-id", f"r{i + 1}",
                              "--operator-listen", f"127.0.0.1:{operator}", "--agent-listen", f"127.0.0.1:{agent_port}",
                              "--enroll-listen", f"127.0.0.1:{enroll}",
                              "--advertise-agent-address", f"127.0.0.1:{agent_port}",
                              "--advertise-operator-address", f"127.0.0.1:{operator}", "--grace-period", "5"],
                             f"replica-{i + 1}.log")
                wait_for_port(f"127.0.0.1:{operator}", proc, f"replica r{i + 1}", directory)
            ca = directory / "ca.pem"
            shutil.copyfile(states[0] / "ca" / "ca.pem", ca)
            token_file = directory / "admin.token"
            if not token_file.exists():
                _cli(states[0], url, "create-admin-token", "--name", "demo-admin", "--no-expiry", "--output",
                     str(token_file))
            home = directory / "agent"
            home.mkdir(exist_ok=True)
            config = {
                "control_plane": {"address": f"127.0.0.1:{ports[0][1]}", "enroll_address": f"127.0.0.1:{ports[0][2]}",
                                  "ca_file": str(ca), "max_streams": count},
                "identity_dir": str(home / "identity"),
                "name": "demo-agent",
                "profiles": {"databases": {"demo-db": {"url": f"sqlite:///{db}", "read_only": True}}},
            }
            (home / "agent.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            if not (home / "identity" / "agent.json").exists():
                enrollment = _cli(states[0], url, "create-enrollment-token", "--group", "demo")
                subprocess.run([str(BIN / "onprem-agent"), "enroll", "--config", str(home / "agent.yaml"),
                                "--token", enrollment], check=True)
            start([str(BIN / "onprem-agent"), "run", "--config", str(home / "agent.yaml")], "agent.log")
            token = token_file.read_text().strip()
            agent = _wait_for_streams(f"127.0.0.1:{ports[0][0]}", ca.read_bytes(), token, count)
            grpcurl = BIN / "grpcurl"
            g = f"{grpcurl} -cacert {ca} -H \"authorization: Bearer $(cat {token_file})\""
            operators = [f"127.0.0.1:{p[0]}" for p in ports]
            print(f"\nonprem replicas demo is up: {count} replicas on PostgreSQL {pg.host}:{pg.port}, agent "
                  f"{agent.name} ({agent.agent_id}) holding streams to {', '.join(agent.replica_ids)}.\n\n"
                  f"Try these:\n\n"
                  f"  # every replica knows the others\n  {g} {operators[0]} onprem.v1.AgentService/ListReplicas\n\n"
                  f"  # any replica answers for any group\n" + "".join(
                      f"  {g} -d '{{\"group\": \"demo\", \"profile\": \"demo-db\", \"sql\": \"SELECT name FROM "
                      f"customers\"}}' {op} onprem.v1.DatabaseService/Query\n" for op in operators) +
                  f"\n  # stop one replica (its pid is in the next line): the others go on serving\n"
                  f"  kill {procs[1].pid}   # r2\n\nLogs: {directory}/*.log. Press Ctrl-C to stop everything.\n",
                  flush=True)
            while all(p.poll() is None for p in procs[:1]) and procs[-1].poll() is None:
                time.sleep(0.5)
            sys.exit(f"demo: a process exited unexpectedly; see {directory}/*.log")
    except KeyboardInterrupt:
        print("\nstopping…", flush=True)
    finally:
        stop_all(procs)
