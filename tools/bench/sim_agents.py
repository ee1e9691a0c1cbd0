"""Many real agents in one process, for the many-agents and replicas benchmarks.

    python -m tools.bench.sim_agents --identities agents.json --address 127.0.0.1:PORT \
        --ca ca.pem --sqlite lite.db --home DIR [--folder DIR]

`agents.json` is a list of enrolled identities ({agent_id, group, key_pem,
cert_pem}). Each becomes a real agent: the agent's own `TunnelClient` with its
own channel (so its own TCP connection, TLS session and client certificate)
and its tunnel streams (one, or one to each replica), a `Dispatcher` of the
real handlers, a tiny SQLite profile `lite` and, with `--folder`, a folder
profile `files`, all in one event loop. Prints `ready N` once every agent has
been welcomed by the control plane; SIGTERM stops them all.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from pathlib import Path

from onprem.agent.config import parse_config
from onprem.agent.dispatcher import Dispatcher
from onprem.agent.handlers.table import build_handlers
from onprem.agent.identity import Identity
from onprem.agent.tunnel_client import TunnelClient


def _client(raw: dict[str, str], args: argparse.Namespace) -> tuple[TunnelClient, Dispatcher]:
    identity = Identity(raw["agent_id"], raw["group"], raw["key_pem"].encode(), raw["cert_pem"].encode())
    config = parse_config({
        "control_plane": {"address": args.address, "enroll_address": args.address, "ca_file": args.ca},
        "identity_dir": str(Path(args.home) / identity.agent_id),
        "name": identity.agent_id,
        "drain_grace_seconds": 1,
        "profiles": {"databases": {"lite": {"url": f"sqlite:///{args.sqlite}", "pool_size": 1}},
                     **({"folders": {"files": {"root": args.folder}}} if args.folder else {})},
    }, base_dir=Path(args.home))
    dispatcher = Dispatcher(build_handlers(config.profiles))
    return TunnelClient(config, identity, dispatcher), dispatcher


async def simulate(args: argparse.Namespace, identities: list[dict[str, str]]) -> None:
    clients = [_client(raw, args) for raw in identities]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    tasks = [loop.create_task(client.run(stop)) for client, _ in clients]
    while not stop.is_set() and not all(client.session is not None for client, _ in clients):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)
    print(f"ready {len(clients)}", flush=True)
    await stop.wait()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.gather(*(dispatcher.aclose() for _, dispatcher in clients), return_exceptions=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.sim_agents")
    for name in ("--identities", "--address", "--ca", "--sqlite", "--home"):
        parser.add_argument(name, required=True)
    parser.add_argument("--folder", help="also a folder profile 'files' with this root")
    args = parser.parse_args(argv)
    Path(args.home).mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING, filename=str(Path(args.home) / "sim.log"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(simulate(args, json.loads(Path(args.identities).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
