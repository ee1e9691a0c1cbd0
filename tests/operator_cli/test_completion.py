"""`onprem completion bash|zsh|fish`: the scripts, loaded in the real shells, complete what the command tree holds.

bash and zsh run the completion function as the shell would on TAB (COMP_WORDS, COMP_CWORD set, COMPREPLY read);
zsh matches the candidates against the word itself, so its candidates are filtered by prefix here as zsh would.
fish answers `complete -C "command line"` with what it would offer.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ONPREM = str(Path(sys.executable).parent / "onprem")

#: (the words before the cursor, the word being completed) -> what completes, in any order.
CASES: list[tuple[list[str], str, set[str]]] = [
    ([], "fi", {"files"}),
    ([], "", {"agents", "groups", "replicas", "query", "download", "upload", "batch", "transaction", "changes",
              "files", "app", "tokens", "create-token", "revoke-token", "enrollment-tokens",
              "revoke-enrollment-token", "audit", "completion"}),
    (["files"], "", {"list", "stat", "rm", "mv", "mkdir", "poll"}),
    (["files", "poll"], "--f", {"--follow", "--format"}),
    (["agents", "list", "--format"], "", {"table", "json", "jsonl", "csv"}),
    (["agents"], "d", {"drain"}),
    (["app"], "", {"call"}),
    (["enrollment-tokens"], "", {"list", "create", "revoke"}),
    (["audit", "--kind"], "a", {"app", "admin", "auth"}),
    (["completion"], "", {"bash", "zsh", "fish"}),
    # The value of --group is not a command: after `agents --group files` come agents' subcommands.
    (["agents", "--group", "files"], "", {"list", "get", "check", "drain", "revoke"}),
    # Connection options before the command are skipped with their values.
    (["--address", "127.0.0.1:8443", "files", "mkdir", "demo", "demo-files", "x"], "--id", {"--idempotency-key"}),
    (["query", "demo", "demo-db", "SELECT 1", "--format"], "", {"csv", "jsonl", "table"}),
]


@pytest.fixture(scope="module")
def scripts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("completion")
    found = {}
    for shell in ("bash", "zsh", "fish"):
        out = subprocess.run([ONPREM, "completion", shell], capture_output=True, text=True, timeout=60,
                             env={"PATH": "/usr/bin:/bin"})  # no token, no control plane: it needs neither
        assert out.returncode == 0, out.stderr
        found[shell] = base / f"onprem.{shell}"
        found[shell].write_text(out.stdout)
    return found


def _posix_shell_completes(shell: str, script: Path, before: list[str], current: str, cwd: Path) -> list[str]:
    words = " ".join(shlex.quote(w) for w in ["onprem", *before, current])
    program = (f"source {shlex.quote(str(script))}\n"
               f"COMP_WORDS=({words}); COMP_CWORD={len(before) + 1}; _onprem\n"
               'printf "%s\\n" "${COMPREPLY[@]}"\n')
    out = subprocess.run([shell, "-c", program], capture_output=True, text=True, timeout=60, cwd=cwd)
    assert out.returncode == 0 and not out.stderr, out.stderr
    return [line for line in out.stdout.splitlines() if line]


@pytest.mark.parametrize(("before", "current", "expected"), CASES)
def test_bash_completes_from_the_command_tree(scripts: dict[str, Path], tmp_path: Path, before: list[str],
                                              current: str, expected: set[str]) -> None:
    assert set(_posix_shell_completes("bash", scripts["bash"], before, current, tmp_path)) == expected


@pytest.mark.parametrize(("before", "current", "expected"), CASES)
def test_zsh_completes_from_the_command_tree(scripts: dict[str, Path], tmp_path: Path, before: list[str],
                                             current: str, expected: set[str]) -> None:
    candidates = _posix_shell_completes("zsh", scripts["zsh"], before, current, tmp_path)
    assert {c for c in candidates if c.startswith(current)} == expected


@pytest.mark.parametrize(("before", "current", "expected"), CASES)
def test_fish_completes_from_the_command_tree(scripts: dict[str, Path], tmp_path: Path, before: list[str],
                                              current: str, expected: set[str]) -> None:
    line = " ".join(shlex.quote(w) for w in ["onprem", *before]) + " " + current
    out = subprocess.run(["fish", "--no-config", "-c", f"source {shlex.quote(str(scripts['fish']))}; "
                          f"complete -C {shlex.quote(line)}"], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert out.returncode == 0 and not out.stderr, out.stderr
    # fish prints "candidate<TAB>description"; short options it may offer alongside long ones are not asked for.
    assert {row.split("\t")[0] for row in out.stdout.splitlines() if row} == expected


def test_bash_registers_the_function_for_onprem(scripts: dict[str, Path]) -> None:
    out = subprocess.run(["bash", "-c", f"source {shlex.quote(str(scripts['bash']))}; complete -p onprem"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout == "complete -o filenames -F _onprem onprem\n"


def test_bash_completes_file_names_for_an_option_that_takes_a_file(scripts: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "orders.watermark").write_text("{}")
    (tmp_path / "other.txt").write_text("")
    assert _posix_shell_completes("bash", scripts["bash"], ["changes", "demo", "demo-db", "--state"], "ord",
                                  tmp_path) == ["orders.watermark"]
