"""The tests' PostgreSQL server: `tools.postgres`, which the replicas demo uses too."""

from __future__ import annotations

from tools.postgres import PASSWORD, PostgresServer, bin_path, running_postgres

__all__ = ["PASSWORD", "PostgresServer", "bin_path", "running_postgres"]
