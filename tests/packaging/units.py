"""Run a systemd unit's commands the way systemd would, on a machine without systemd (CI).

The packaging test runs the installed units' own ExecStartPre and ExecStart lines, so that what it proves is
what the unit runs: the variables of EnvironmentFile= are expanded as systemd expands them (`$VAR` alone
becomes as many arguments as it has words, `${VAR}` stays one), and the command runs as the unit's User= and
Group=, without root's supplementary groups, with the unit's UMask=, from /.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import IO

_WHOLE_VARIABLE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_BRACED_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class Unit:
    path: Path
    service: dict[str, str]

    @classmethod
    def read(cls, path: Path) -> Unit:
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read(path)
        return cls(path, dict(parser["Service"]))

    @property
    def user(self) -> str:
        return self.service["User"]

    @property
    def group(self) -> str:
        return self.service.get("Group", self.user)

    def environment(self) -> dict[str, str]:
        """The variables of the unit's EnvironmentFile= ("-" before the path: the file may be missing)."""
        spec = self.service.get("EnvironmentFile")
        if not spec:
            return {}
        optional, path = spec.startswith("-"), Path(spec.removeprefix("-"))
        if not path.exists() and optional:
            return {}
        variables = {}
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith(("#", ";")) or "=" not in line:
                continue
            key, value = line.split("=", 1)
            words = shlex.split(value)
            variables[key.strip()] = " ".join(words) if len(words) != 1 else words[0]
        return variables

    def command(self, key: str) -> list[str]:
        """The argv of ExecStart= (or another Exec line), its variables expanded."""
        variables = self.environment()
        argv: list[str] = []
        for word in shlex.split(self.service[key]):
            whole = _WHOLE_VARIABLE.fullmatch(word)
            if whole:
                argv.extend(variables.get(whole[1], "").split())
            else:
                argv.append(_BRACED_VARIABLE.sub(lambda m: variables.get(m[1], ""), word))
        return argv

    def process_env(self) -> dict[str, str]:
        """What systemd gives a service: a plain PATH, the user's names and home, and the EnvironmentFile."""
        import pwd

        entry = pwd.getpwnam(self.user)
        return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                "USER": self.user, "LOGNAME": self.user, "HOME": entry.pw_dir, "SHELL": entry.pw_shell,
                **self.environment()}

    def _umask(self) -> int:
        return int(self.service.get("UMask", "0022"), 8)

    def run(self, key: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run an Exec line to completion (ExecStartPre)."""
        return subprocess.run(self.command(key), user=self.user, group=self.group, extra_groups=[],
                              umask=self._umask(), cwd="/", env=self.process_env(), capture_output=True, text=True,
                              timeout=timeout)

    def start(self, log: IO[bytes]) -> subprocess.Popen[bytes]:
        """Start ExecStart in the background, its output to `log`."""
        return subprocess.Popen(self.command("ExecStart"), user=self.user, group=self.group, extra_groups=[],
                                umask=self._umask(), cwd="/", env=self.process_env(), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def as_user(user: str, argv: list[str], timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command as `user`, as an admin would with `runuser -u USER -- ...`."""
    import pwd

    entry = pwd.getpwnam(user)
    return subprocess.run(argv, user=user, group=entry.pw_gid, extra_groups=[], cwd="/",
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": entry.pw_dir,
                               "LANG": "C.UTF-8", **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
