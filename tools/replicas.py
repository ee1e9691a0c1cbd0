"""Control-plane replicas sharing one real PostgreSQL database, as processes, for the replica tests and benchmark.

The first replica makes the CA; the others get a copy of its `ca.pem` and `ca.key` before they start,
as docs/ha.md tells operators to do. Each advertises its own agent address, so that agents dial every
replica directly.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tools.cluster import ControlPlaneProcess
from tools.postgres import PostgresServer

#: Quick heartbeats and checks, so that a replica that left is noticed in about a second.
FAST = ["--replica-heartbeat", "0.3", "--change-check-interval", "0.5"]


def new_database(postgres: PostgresServer) -> str:
    name = f"replicas_{uuid.uuid4().hex[:12]}"
    postgres.create_database(name)
    return postgres.url(name)


def share_ca(source: ControlPlaneProcess, target: ControlPlaneProcess) -> None:
    """Provision `target` with `source`'s CA, as files (the key never goes into the database)."""
    (target.state_dir / "ca").mkdir(parents=True, exist_ok=True)
    for name in ("ca.pem", "ca.key"):
        shutil.copy2(source.state_dir / "ca" / name, target.state_dir / "ca" / name)


def replica(root: Path, name: str, url: str, *extra: str, fast: bool = True) -> ControlPlaneProcess:
    """Replica `name` in `root/name`; `fast`: the quick heartbeats of `FAST`, else the defaults."""
    cp = ControlPlaneProcess(root / name, database_url=url)
    cp.extra_args = ["--replica-id", name, "--advertise-agent-address", f"127.0.0.1:{cp.agent_port}",
                     "--advertise-operator-address", cp.operator_address, *(FAST if fast else []), *extra]
    return cp


@dataclass
class Replicas:
    """Replicas r1, r2, r3… on one database; `start()` starts them, the CA shared."""

    root: Path
    url: str
    count: int = 3
    #: The quick heartbeats of `FAST` (the tests), or the defaults (the benchmark).
    fast: bool = True
    members: list[ControlPlaneProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.members = [replica(self.root, f"r{i + 1}", self.url, fast=self.fast) for i in range(self.count)]

    def start(self) -> None:
        first, *rest = self.members
        first.start()
        for cp in rest:
            share_ca(first, cp)
            cp.start()

    def stop(self) -> None:
        for cp in self.members:
            cp.stop()

    def __getitem__(self, index: int) -> ControlPlaneProcess:
        return self.members[index]
