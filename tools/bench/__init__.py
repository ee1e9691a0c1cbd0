"""`make bench`: figures measured side by side with a baseline in the same run.

Each module here (one per subject) has `run(workdir: Path) -> list[Figure]`;
`python -m tools.bench` runs them, prints one table, and writes
docs/benchmarks.md with the machine and the date. Benchmarks report ratios
and peak memory; nothing here is a timed test assertion.
"""
