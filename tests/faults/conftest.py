"""The fault-injection suite runs on its own (`make test-faults`), so it brings the session's fixtures along."""

from __future__ import annotations

from tests.conftest import postgres

__all__ = ["postgres"]
