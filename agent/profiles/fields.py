"""Reading one profile's settings: typed field readers whose errors name the profile and the field.

Every reader raises `ConfigError` with a message of the form
`profiles.<kind>.<name>.<field>: what is wrong`, so a typo in the config fails
at start-up and says where.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ENV_NAME", "HEADER_NAME", "NAME", "ConfigError", "Fields"]

#: A profile's name.
NAME = re.compile(r"^[A-Za-z0-9_-]+$")
#: An environment variable's name.
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: RFC 9110 token characters: what a header field name (or an HTTP method) may contain.
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class ConfigError(ValueError):
    """The agent's config is invalid; the message names the profile and field."""


@dataclass(frozen=True)
class Fields:
    """One mapping of settings at `where` (e.g. "profiles.databases.erp"), read field by field."""

    where: str
    body: Mapping[str, Any]

    @classmethod
    def known(cls, where: str, body: Mapping[str, Any], known: Iterable[str]) -> Fields:
        """The settings at `where`, refusing any field not in `known`."""
        names = set(known)
        unknown = sorted(str(k) for k in body if k not in names)
        if unknown:
            raise ConfigError(f"{where}: unknown field {unknown[0]!r}; expected one of {', '.join(sorted(names))}")
        return cls(where, body)

    def __contains__(self, key: str) -> bool:
        return key in self.body

    def get(self, key: str, default: Any = None) -> Any:
        """The raw value, unchecked."""
        return self.body.get(key, default)

    def error(self, message: str, key: str | None = None) -> ConfigError:
        """`where.key: message` (or `where: message`), to raise."""
        return ConfigError(f"{self.where}.{key}: {message}" if key is not None else f"{self.where}: {message}")

    def required_str(self, key: str) -> str:
        if self.body.get(key) is None:
            raise self.error("required", key)
        return self._str(key)

    def optional_str(self, key: str) -> str | None:
        return None if self.body.get(key) is None else self._str(key)

    def _str(self, key: str) -> str:
        value = self.body[key]
        if not isinstance(value, str) or not value:
            raise self.error("expected a non-empty string", key)
        return value

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.body.get(key, default)
        # YAML's `yes`/`no` already arrive as bools; a quoted "false" is a mistake worth naming.
        if not isinstance(value, bool):
            raise self.error(f"expected true or false, got {value!r}", key)
        return value

    def positive_int(self, key: str, default: int) -> int:
        """The field, or `default` when it is absent (an explicit null is refused)."""
        return self._positive_int(key, self.body.get(key, default))

    def optional_positive_int(self, key: str) -> int | None:
        value = self.body.get(key)
        return None if value is None else self._positive_int(key, value)

    def _positive_int(self, key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.error(f"expected a positive integer, got {value!r}", key)
        return value

    def seconds(self, key: str, default: float) -> float:
        """The field, or `default` when it is absent (an explicit null is refused)."""
        return self._seconds(key, self.body.get(key, default))

    def optional_seconds(self, key: str) -> float | None:
        value = self.body.get(key)
        return None if value is None else self._seconds(key, value)

    def _seconds(self, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise self.error(f"expected a positive number of seconds, got {value!r}", key)
        return float(value)
