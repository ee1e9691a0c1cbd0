"""Run the benchmarks, print the table, write docs/benchmarks.md.

    python -m tools.bench                 # every benchmark
    python -m tools.bench files database  # some of them
"""

from __future__ import annotations

import datetime as dt
import importlib
import sys
import tempfile
from pathlib import Path

from tools.bench.common import Figure, machine

ROOT = Path(__file__).resolve().parents[2]
#: Benchmark modules under tools/bench, in the order they run.
SUBJECTS = ["small_requests", "database", "files", "head_of_line", "in_flight", "many_agents", "replicas", "hostile",
            "footprint"]


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def table(figures: list[Figure]) -> str:
    rows = ["| figure | value | baseline | ratio | target | met |", "| --- | --- | --- | --- | --- | --- |"]
    for f in figures:
        baseline = f"{_fmt(f.baseline)} {f.unit} ({f.baseline_name})" if f.baseline is not None else "—"
        ratio = f"{f.ratio:.0%}" if f.ratio is not None else "—"
        met = {True: "met", False: "**missed**", None: "—"}[f.met]
        rows.append(f"| {f.name} | {_fmt(f.value)} {f.unit} | {baseline} | {ratio} | {f.target} | {met} |")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    subjects = argv or SUBJECTS
    figures: list[Figure] = []
    for subject in subjects:
        module = importlib.import_module(f"tools.bench.{subject}")
        print(f"== {subject}", flush=True)
        with tempfile.TemporaryDirectory(prefix=f"onprem-bench-{subject}-") as workdir:
            results = module.run(Path(workdir))
        for f in results:
            print(f"   {f.name}: {_fmt(f.value)} {f.unit}"
                  + (f" vs {_fmt(f.baseline)} ({f.baseline_name}), {f.ratio:.0%}" if f.ratio is not None else ""),
                  flush=True)
        figures.extend(results)
    rendered = table(figures)
    print("\n" + rendered)
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    doc = ROOT / "docs" / "benchmarks.md"
    doc.parent.mkdir(exist_ok=True)
    doc.write_text(
        "# Benchmarks\n\n"
        f"Written by `make bench` on {now}, on {machine()}.\n\n"
        "Each throughput figure is compared with a baseline measured in the same run on the same machine, "
        "so the ratio is what to read; absolute numbers drift with the machine's load. Peak memory is the "
        "process's VmHWM.\n\n"
        f"{rendered}\n"
    )
    print(f"\nwritten to {doc.relative_to(ROOT)}")
    return 0 if all(f.met is not False for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
