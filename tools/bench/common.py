"""What every benchmark reports, and the measuring helpers they share."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

#: The log level the benchmarked processes run at: an installed service's (the units and the package run INFO).
#: Tests run DEBUG so a failure's log says everything, and DEBUG costs about 3% of each side's CPU per small
#: request (docs/perf/README.md), which the bare relay, logging nothing, does not pay.
BENCH_LOG_LEVEL = "INFO"


@dataclass(frozen=True)
class Figure:
    """One measured figure, with the baseline it is compared against when there is one."""

    #: What was measured, e.g. "1 GiB file read through the tunnel".
    name: str
    value: float
    #: The unit of `value` (and `baseline`), e.g. "MB/s", "rows/s", "MB".
    unit: str
    #: A human statement of the target, e.g. ">= 40% of baseline" or "< 200 MB".
    target: str
    #: Whether the target was met (None when the figure has no target).
    met: bool | None
    #: What the figure is compared against, e.g. "bare grpc.aio stream".
    baseline_name: str = ""
    baseline: float | None = None

    @property
    def ratio(self) -> float | None:
        if self.baseline in (None, 0):
            return None
        assert self.baseline is not None
        return self.value / self.baseline


def ratio_figure(name: str, value: float, unit: str, baseline_name: str, baseline: float,
                 min_ratio: float) -> Figure:
    """A throughput figure whose target is a fraction of its baseline."""
    return Figure(name=name, value=value, unit=unit, baseline_name=baseline_name, baseline=baseline,
                  target=f">= {min_ratio:.0%} of baseline", met=value >= min_ratio * baseline)


def peak_rss_figure(name: str, mib: float, limit_mib: float) -> Figure:
    return Figure(name=name, value=mib, unit="MiB", target=f"< {limit_mib:.0f} MiB", met=mib < limit_mib)


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set size so far (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """`with stopwatch() as elapsed:` ... `elapsed[0]` is the wall time in seconds."""
    box: list[float] = []
    began = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - began)


def machine() -> str:
    cpus = os.cpu_count()
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f", {int(line.split()[1]) / 1024 / 1024:.0f} GiB RAM"
    except OSError:
        pass
    return f"{platform.machine()}, {cpus} CPUs{mem}, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used so far, in seconds, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime and stime fields 14 and 15 (man 5 proc).
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU time used by some processes between `start()` and `stop()`."""

    def __init__(self, pids: list[int]) -> None:
        self._pids = pids
        self._began: list[float] = []
        #: Seconds of CPU per process over the last start/stop, in the order of `pids`.
        self.used: list[float] = []

    def start(self) -> None:
        self._began = [cpu_seconds(pid) for pid in self._pids]

    def stop(self) -> list[float]:
        self.used = [cpu_seconds(pid) - began for pid, began in zip(self._pids, self._began, strict=True)]
        return self.used
