"""The tests' replicas: `tools.replicas`, which the replicas benchmark uses too."""

from __future__ import annotations

from tools.replicas import FAST, Replicas, new_database, replica, share_ca

__all__ = ["FAST", "Replicas", "new_database", "replica", "share_ca"]
