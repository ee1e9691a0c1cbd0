"""Flame graphs of the control plane and the agent under the small-requests load.

    python -m tools.bench.profile before            # docs/perf/before-control-plane.svg, before-agent.svg
    python -m tools.bench.profile after --seconds 30
    python -m tools.bench.profile file-before --load file   # a 256 MiB file read again and again

Starts the small-requests benchmark's cluster (a control plane and an agent with
a SQLite profile), drives `SELECT 1` with 64 in flight, and meanwhile samples
both processes with py-spy (`py-spy record`, every thread, 200 samples a
second, native frames left out), one SVG each. The CPU time each process used
per request over the same window is printed, and so is the request rate, so
that a graph can be read against its numbers. docs/perf/README.md reads them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from onprem.v1 import files_pb2, files_pb2_grpc
from tools.bench.common import CpuMeter
from tools.bench.small_requests import (
    CONCURRENCY,
    GROUP,
    drive,
    query_once,
    start_cluster,
    wait_active,
)
from tools.cluster import bearer, operator_channel

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "docs" / "perf"
RATE = 200
#: PROFILE_NATIVE=1 adds C frames (grpc's core, OpenSSL), which needs py-spy to pause the process.
NATIVE: list[str] = ["--native"] if os.environ.get("PROFILE_NATIVE") else ["--nonblocking"]
#: More py-spy options, e.g. PROFILE_ARGS="--gil --threads" (only samples holding the GIL, one stack per thread).
EXTRA: list[str] = os.environ.get("PROFILE_ARGS", "").split()


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed: pip install py-spy (it is in the project's dev extras)")
    return found


#: The file of `--load file`, read whole by each request.
FILE_BYTES = 256 * 1024 * 1024


async def _load_for(seconds: float, cp_pid: int, agent_pid: int, one: Callable[[], Awaitable[None]],
                    batch: int, concurrency: int) -> tuple[int, list[float]]:
    """Drive requests for about `seconds`; the number done and CPU seconds of each process."""
    meter = CpuMeter([cp_pid, agent_pid])
    meter.start()
    done = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        load = await drive(one, batch, concurrency)
        done += load.requests
    return done, meter.stop()


def _write_file(path: Path) -> None:
    block = os.urandom(4 * 1024 * 1024)
    with path.open("wb") as f:
        for _ in range(FILE_BYTES // len(block)):
            f.write(block)


def _read_once(channel: grpc.aio.Channel, token: str) -> Callable[[], Awaitable[None]]:
    stub = files_pb2_grpc.FileServiceStub(channel)
    request = files_pb2.ReadRequest(group=GROUP, profile="files", path="big.bin")

    async def one() -> None:
        received = 0
        async for part in stub.Read(request, metadata=bearer(token)):
            received += len(part.data)
        if received != FILE_BYTES:
            raise AssertionError(f"read {received} bytes of {FILE_BYTES}")

    return one


async def _profile(workdir: Path, label: str, seconds: float, out: Path, fmt: str, load: str) -> None:
    profiles = None
    if load == "file":
        folder = workdir / "folder"
        folder.mkdir()
        await asyncio.to_thread(_write_file, folder / "big.bin")
        profiles = {"folders": {"files": {"root": str(folder), "read_only": True}}}
    with start_cluster(workdir, profiles) as cluster:
        await wait_active(cluster)
        async with operator_channel(cluster.cp) as channel:
            if load == "file":
                one, batch, concurrency = _read_once(channel, cluster.token), 1, 1
            else:
                one, batch, concurrency = query_once(channel, cluster.token), 2000, CONCURRENCY
            await drive(one, max(1, batch // 2), concurrency)  # warm-up: connections, pools, caches
            spies = []
            for pid, name in ((cluster.cp_pid, "control-plane"), (cluster.agent_pid, "agent")):
                target = out / f"{label}-{name}.{'svg' if fmt == 'flamegraph' else 'folded'}"
                spies.append(await asyncio.create_subprocess_exec(
                    _py_spy(), "record", "--pid", str(pid), "--rate", str(RATE), "--duration", str(int(seconds)),
                    "--format", fmt, "--output", str(target), *NATIVE, *EXTRA,
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE))
            began = time.monotonic()
            done, (cp_cpu, agent_cpu) = await _load_for(seconds, cluster.cp_pid, cluster.agent_pid, one, batch,
                                                         concurrency)
            elapsed = time.monotonic() - began
            for spy in spies:
                _, err = await asyncio.wait_for(spy.communicate(), seconds + 60)
                if spy.returncode != 0:
                    raise SystemExit(f"py-spy failed: {err.decode(errors='replace')}")
    print(f"{label}: {done} requests in {elapsed:.1f} s ({done / elapsed:,.0f} req/s), CPU per request: "
          f"control plane {cp_cpu / done * 1000:.3f} ms, agent {agent_cpu / done * 1000:.3f} ms")
    print(f"written to {out}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.profile")
    parser.add_argument("label", help="the graphs' name prefix, e.g. before or after")
    parser.add_argument("--seconds", type=float, default=20, help="how long to sample (default 20)")
    parser.add_argument("--load", choices=["small", "file"], default="small",
                        help="SELECT 1 with 64 in flight (default), or a 256 MiB file read whole, one at a time")
    parser.add_argument("--folded", metavar="DIR", type=Path,
                        help="write the collapsed stacks (py-spy's raw format) to DIR instead of SVGs to docs/perf")
    args = parser.parse_args(argv)
    out, fmt = (args.folded, "raw") if args.folded else (OUT, "flamegraph")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="onprem-profile-") as workdir:
        asyncio.run(_profile(Path(workdir), args.label, args.seconds, out, fmt, args.load))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
