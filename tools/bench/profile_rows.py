"""Flame graphs of the control plane and the agent while the database benchmark's 1M-row query streams.

    python -m tools.bench.profile_rows before             # docs/perf/rows-before-agent.svg, ...-control-plane.svg
    python -m tools.bench.profile_rows after --seconds 30
    python -m tools.bench.profile_rows before --folded /tmp/folded   # collapsed stacks instead, for reading

Starts the database benchmark's cluster (PostgreSQL, a control plane, an agent
with a PostgreSQL profile), runs the 1M-row query again and again, one at a
time, and meanwhile samples both processes with py-spy: 200 samples a second,
one stack per thread, only samples in which the thread held the GIL (`--gil`:
in CPython the time that counts, since one process runs Python on one core at
a time; PROFILE_ALL=1 keeps the others too; PROFILE_NATIVE=1 adds C frames, which
needs py-spy to pause the process). The rows per second and the CPU
time each process used per million rows over the same window are printed, so
that a graph can be read against its numbers.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tools.bench.common import CpuMeter
from tools.bench.database import ROWS, rows_cluster, through_tunnel
from tools.bench.profile import NATIVE, OUT, RATE, _py_spy

GIL: list[str] = [] if os.environ.get("PROFILE_ALL") else ["--gil"]


def _profile(workdir: Path, label: str, seconds: float, out: Path, fmt: str) -> None:
    with rows_cluster(workdir) as cluster:
        through_tunnel(cluster, ROWS)  # warm-up: the agent's engine and pool, the tunnel's windows
        cp_pid, agent_pid = cluster.pids()
        spies = []
        for pid, name in ((cp_pid, "control-plane"), (agent_pid, "agent")):
            target = out / f"rows-{label}-{name}.{'svg' if fmt == 'flamegraph' else 'folded'}"
            spies.append(subprocess.Popen(
                [_py_spy(), "record", "--pid", str(pid), "--rate", str(RATE), "--duration", str(int(seconds)),
                 "--format", fmt, "--output", str(target), "--threads", *NATIVE, *GIL],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        meter = CpuMeter([cp_pid, agent_pid])
        meter.start()
        began = time.monotonic()
        rates = []
        while time.monotonic() - began < seconds:
            rates.append(through_tunnel(cluster, ROWS))
        elapsed = time.monotonic() - began
        cp_cpu, agent_cpu = meter.stop()
        for spy in spies:
            _, err = spy.communicate(timeout=seconds + 60)
            if spy.returncode != 0:
                raise SystemExit(f"py-spy failed: {err.decode(errors='replace')}")
    millions = len(rates) * ROWS / 1e6
    print(f"{label}: {len(rates)} queries of {ROWS:,} rows in {elapsed:.1f} s, "
          f"{', '.join(f'{r:,.0f}' for r in rates)} rows/s; CPU per million rows: "
          f"control plane {cp_cpu / millions:.2f} s, agent {agent_cpu / millions:.2f} s")
    print(f"written to {out}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.profile_rows")
    parser.add_argument("label", help="the graphs' name prefix, e.g. before or after")
    parser.add_argument("--seconds", type=float, default=20, help="how long to sample (default 20)")
    parser.add_argument("--folded", metavar="DIR", type=Path,
                        help="write the collapsed stacks (py-spy's raw format) to DIR instead of SVGs to docs/perf")
    args = parser.parse_args(argv)
    out, fmt = (args.folded, "raw") if args.folded else (OUT, "flamegraph")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="onprem-profile-rows-") as workdir:
        _profile(Path(workdir), args.label, args.seconds, out, fmt)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
