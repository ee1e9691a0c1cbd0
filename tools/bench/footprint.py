"""The agent's footprint: memory idle and under load, and what `pip install` puts on disk.

* RSS of a real agent connected to a real control plane, idle (connected, a
  few seconds after start), and its peak (VmHWM) under the load of the
  small-requests benchmark (`SELECT 1` on SQLite, 64 in flight, a few thousand
  requests).
* The installed size: a fresh venv in the work folder, into which `pip
  install` brings the project (built from a copy of its sources) with its
  runtime dependencies ([project.dependencies] of pyproject.toml); the figure is
  the growth of site-packages and bin over the fresh venv's (which holds only
  pip). The project is one distribution, so this includes the control plane's
  code (a few hundred KB) and its few extra libraries (grpcio-reflection and
  grpcio-health-checking): an upper bound for the agent alone.

The baselines are what Workato's on-prem agent asks for: 8 GB of RAM and 250 MB
of disk. Targets: RSS under 200 MiB (2.5% of 8 GB, and the limit the design sets
for peak memory while streaming), install under 125 MB (half of 250 MB: most of
it is grpcio, cryptography, SQLAlchemy and the database drivers, which any
agent of this kind needs).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from tools.bench.common import Figure, peak_rss_mib, rss_mib
from tools.bench.small_requests import (
    CONCURRENCY,
    REQUESTS,
    WARMUP,
    Cluster,
    drive,
    query_once,
    start_cluster,
    wait_active,
)
from tools.cluster import operator_channel

ROOT = Path(__file__).resolve().parents[2]
WORKATO_RAM_MIB = 8 * 1024
WORKATO_DISK_MB = 250.0
RSS_LIMIT_MIB = 200.0
DISK_LIMIT_MB = 125.0
#: What `pip install .` needs from a checkout (tools/stubs holds other languages' generated code).
SOURCES = ["pyproject.toml", "README.md", "agent", "control_plane", "tunnel", "generated", "operator_cli", "tools"]


def _tree_bytes(*roots: Path) -> int:
    total = 0
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                path = Path(dirpath) / name
                if not path.is_symlink():
                    total += path.stat().st_size
    return total


def installed_mb(workdir: Path) -> tuple[float, list[str]]:
    """MB that `pip install` of the project and its runtime dependencies adds to a fresh venv."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    src = workdir / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "stubs", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    venv = workdir / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    (site,) = (venv / "lib").glob("python*/site-packages")
    before = _tree_bytes(site, venv / "bin")
    # As a default install does, byte-compiled (.pyc) included.
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                          str(src)], capture_output=True, text=True, cwd=workdir)
    if pip.returncode != 0:
        raise RuntimeError(f"pip install failed ({pip.returncode}):\n{pip.stderr}")
    after = _tree_bytes(site, venv / "bin")
    return (after - before) / 1e6, list(dependencies)


async def _rss(cluster: Cluster) -> tuple[float, float]:
    await wait_active(cluster)
    await asyncio.sleep(3)
    idle = rss_mib(cluster.agent_pid)
    async with operator_channel(cluster.cp) as channel:
        one = query_once(channel, cluster.token)
        await drive(one, WARMUP, CONCURRENCY)
        await drive(one, REQUESTS, CONCURRENCY)
    return idle, peak_rss_mib(cluster.agent_pid)


def run(workdir: Path) -> list[Figure]:
    with start_cluster(workdir) as cluster:
        idle, loaded = asyncio.run(_rss(cluster))
    disk, dependencies = installed_mb(workdir)
    workato_ram = "Workato's agent: 8 GB RAM"
    return [
        Figure("agent RSS, idle (connected, SQLite profile)", idle, "MiB", target=f"< {RSS_LIMIT_MIB:.0f} MiB",
               met=idle < RSS_LIMIT_MIB, baseline_name=workato_ram, baseline=WORKATO_RAM_MIB),
        Figure(f"agent peak RSS under small requests ({CONCURRENCY} in flight)", loaded, "MiB",
               target=f"< {RSS_LIMIT_MIB:.0f} MiB", met=loaded < RSS_LIMIT_MIB,
               baseline_name=workato_ram, baseline=WORKATO_RAM_MIB),
        Figure(f"installed size: `pip install` of the project and its {len(dependencies)} runtime dependencies "
               "into a fresh venv", disk, "MB", target=f"< {DISK_LIMIT_MB:.0f} MB", met=disk < DISK_LIMIT_MB,
               baseline_name="Workato's agent: 250 MB disk", baseline=WORKATO_DISK_MB),
    ]
