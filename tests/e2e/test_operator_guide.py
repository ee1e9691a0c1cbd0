"""docs/operators.md cannot rot: every command in it runs, in order, against a live demo and prints what it says.

The guide's convention: each ```bash block is run (```bash norun blocks are not), and the fenced block right
after it is what it prints, stdout and stderr together (```json: one or more JSON messages, compared by keys and
stable values; ```text: compared line by line), with `exit=N` in its info string when the exit status is not 0.
Commands are written for `make run` (var/demo, 127.0.0.1:8443-8445, app port 8480); the test rewrites those to
its own demo's folder and ports, and maps its outputs back before comparing.

After an intended API change, refresh the documented outputs from a real run and review the diff:

    .venv/bin/python -m tests.e2e.test_operator_guide --write
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "operators.md"
CANONICAL_PORTS = {"operator": 8443, "agent": 8444, "enroll": 8445, "app": 8480}

# Values that differ from run to run; the test checks that they are present, not what they are.
VOLATILE_KEYS = {
    "agent_id", "session_id", "hostname", "version", "token", "enrolled_at", "last_seen_at", "uptime",
    "certificate_expires_at", "expires_at", "created_at", "modified_at", "changed_at", "checked_at", "marker",
    "replica_ids", "id", "time", "duration_ms", "peer", "next_page_token", "trace_id",
}
_FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_VOLATILE_TEXT = [
    (re.compile(r"onp[a-z]?_[A-Za-z0-9_-]+"), "<token>"),
    (re.compile(r"agent-[0-9a-f]{16}"), "<agent-id>"),
    (re.compile(r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])"), "<trace-id>"),  # W3C trace ids
    (re.compile(r"(?<![0-9a-f])[0-9a-f]{16}(?![0-9a-f])"), "<id>"),  # token ids, alone or in tokens/<id>
    (re.compile(r"local CLI \([^)]*\)"), "local CLI (<user>)"),  # who ran onprem-control-plane
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)?"), "<time>"),
    (re.compile(r"/[\w.+-]+(/[\w.+-]+)*/var/demo"), "var/demo"),
]


@dataclass
class Step:
    """A runnable command of the guide and what the guide says it prints."""

    index: int
    command: str
    language: str  # of the output block: json or text
    exit_code: int
    output: str
    output_span: tuple[int, int]  # where the output block's body and info string sit in the guide
    line: int

    def label(self) -> str:
        return f"docs/operators.md line {self.line}"


def parse_guide(text: str) -> list[Step]:
    blocks = list(_FENCE.finditer(text))
    steps: list[Step] = []
    i = 0
    while i < len(blocks):
        info = blocks[i].group(1).split()
        if info[:1] != ["bash"] or "norun" in info:
            i += 1
            continue
        line = text.count("\n", 0, blocks[i].start()) + 1
        if i + 1 >= len(blocks) or blocks[i + 1].group(1).split()[:1] not in (["json"], ["text"]):
            raise AssertionError(f"docs/operators.md line {line}: a bash block needs a ```json or ```text "
                                 "block right after it with what it prints")
        out = blocks[i + 1]
        out_info = out.group(1).split()
        exit_code = 0
        for word in out_info[1:]:
            if word.startswith("exit="):
                exit_code = int(word.removeprefix("exit="))
        steps.append(Step(len(steps), blocks[i].group(2), out_info[0], exit_code, out.group(2),
                          (out.start(), out.end()), line))
        i += 2
    return steps


@dataclass
class Demo:
    directory: Path
    base_port: int
    app_port: int

    def ports(self) -> dict[int, int]:
        return {CANONICAL_PORTS["operator"]: self.base_port, CANONICAL_PORTS["agent"]: self.base_port + 1,
                CANONICAL_PORTS["enroll"]: self.base_port + 2, CANONICAL_PORTS["app"]: self.app_port}

    def rewrite(self, command: str) -> str:
        """A command written for `make run`, aimed at this demo instead."""
        command = re.sub(r"(\$PWD/)?var/demo", str(self.directory), command)
        for canonical, port in self.ports().items():
            command = re.sub(rf"127\.0\.0\.1:{canonical}\b", f"127.0.0.1:{port}", command)
        return command

    def as_documented(self, output: str) -> str:
        """This demo's output as `make run` in the repository would print it."""
        output = output.replace(str(self.directory), str(ROOT / "var" / "demo"))
        for canonical, port in self.ports().items():
            output = re.sub(rf"(?<=127\.0\.0\.1:){port}\b", str(canonical), output)
        return output


def _free_block(size: int) -> int:
    for _ in range(100):
        base = random.randint(20_000, 40_000)
        with socket.socket() as probe:
            if all(probe.connect_ex(("127.0.0.1", p)) != 0 for p in range(base, base + size)):
                return base
    raise RuntimeError("no free block of ports")


def start_demo(directory: Path) -> tuple[Demo, subprocess.Popen[str]]:
    base = _free_block(5)  # the operator API, agents, enrollment, the console, and the demo's app
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.demo", "--dir", str(directory), "--base-port", str(base),
         "--app-port", str(base + 4)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert proc.stdout is not None
    printed = []
    for line in proc.stdout:
        printed.append(line)
        if "Press Ctrl-C" in line:
            return Demo(directory.resolve(), base, base + 4), proc
    raise RuntimeError("the demo ended early:\n" + "".join(printed))


def stop_demo(demo: Demo, proc: subprocess.Popen[str]) -> None:
    pid_file = demo.directory / "spare" / "agent.pid"  # the guide's background agent, if a step failed early
    if pid_file.exists():
        try:
            pid = int(pid_file.read_text().strip())
            # Only if that pid is still our spare agent, not a process that reused the number.
            if str(demo.directory / "spare" / "agent.yaml") in Path(f"/proc/{pid}/cmdline").read_text():
                os.kill(pid, signal.SIGTERM)
        except (ValueError, OSError):
            pass
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_step(demo: Demo, step: Step) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-o", "pipefail", "-c", demo.rewrite(step.command)], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=90)


# --- comparing ---------------------------------------------------------------------------------------

def normalize_text(text: str) -> str:
    for pattern, replacement in _VOLATILE_TEXT:
        text = pattern.sub(replacement, text)
    return text


def json_messages(text: str) -> list[object]:
    """The JSON values printed one after another (grpcurl prints one per streamed message)."""
    decoder = json.JSONDecoder()
    values, position = [], 0
    text = text.strip()
    while position < len(text):
        value, end = decoder.raw_decode(text, position)
        values.append(value)
        position = end
        while position < len(text) and text[position].isspace():
            position += 1
    return values


def compare_json(documented: object, actual: object, where: str = "$") -> list[str]:
    """Differences in keys, list lengths and stable values; volatile values need only be there."""
    if isinstance(documented, dict) and isinstance(actual, dict):
        problems = []
        if set(documented) != set(actual):
            problems.append(f"{where}: keys {sorted(actual)} instead of {sorted(documented)}")
        for key in set(documented) & set(actual):
            if key in VOLATILE_KEYS or (key == "message" and ".checks[" in where) or (
                    key == "value" and ".headers[" in where):
                # A check's message names the machine (database version, paths), an HTTP header's value may
                # (Server, Date); their presence is the contract.
                if type(documented[key]) is not type(actual[key]):
                    problems.append(f"{where}.{key}: {actual[key]!r} is not like {documented[key]!r}")
                continue
            problems += compare_json(documented[key], actual[key], f"{where}.{key}")
        return problems
    if isinstance(documented, list) and isinstance(actual, list):
        if len(documented) != len(actual):
            return [f"{where}: {len(actual)} items instead of {len(documented)}: {actual!r}"]
        return [p for i, (d, a) in enumerate(zip(documented, actual, strict=True))
                for p in compare_json(d, a, f"{where}[{i}]")]
    if isinstance(documented, str) and isinstance(actual, str):
        documented, actual = normalize_text(documented), normalize_text(actual)
    if documented != actual:
        return [f"{where}: {actual!r} instead of {documented!r}"]
    return []


def compare_output(step: Step, actual: str) -> list[str]:
    if step.language == "json":
        try:
            return compare_json(json_messages(step.output), json_messages(actual))
        except json.JSONDecodeError as e:
            return [f"not the JSON the guide shows ({e}):\n{actual}"]
    want, got = normalize_text(step.output).rstrip().splitlines(), normalize_text(actual).rstrip().splitlines()
    if want != got:
        return [f"printed:\n{actual}\ninstead of:\n{step.output}"]
    return []


# --- the test ----------------------------------------------------------------------------------------

STEPS = parse_guide(GUIDE.read_text())


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    running, proc = start_demo(tmp_path_factory.mktemp("guide") / "demo")
    try:
        yield running
    finally:
        stop_demo(running, proc)


def test_the_guide_calls_every_operator_rpc() -> None:
    text = "\n".join(step.command for step in STEPS)
    services = {
        "DatabaseService": ["Query", "ExecuteBatch", "ExecuteTransaction", "PollChanges"],
        "FileService": ["List", "Stat", "Read", "Write", "Delete", "Move", "MakeDirectory", "Poll"],
        "AppService": ["Call"],
        "AgentService": ["ListAgents", "GetAgent", "ListGroups", "CreateEnrollmentToken", "RevokeAgent",
                         "CheckProfile", "DrainAgent"],
        "TokenService": ["CreateToken", "ListTokens", "RevokeToken", "ListEnrollmentTokens",
                         "RevokeEnrollmentToken"],
        "AuditService": ["ListAuditEvents"],
    }
    missing = [f"{s}/{m}" for s, methods in services.items() for m in methods
               if not re.search(rf"onprem\.v1\.{s}/{m}\b", text)]
    assert not missing, f"the guide runs no command for {missing}"
    for name in ("list", "describe", "grpc.health.v1.Health/Check", "-format-error", "-v "):
        assert name in text


def test_every_command_in_the_guide_exits_and_prints_as_documented(demo: Demo) -> None:
    assert STEPS, "no runnable command found in docs/operators.md"
    for step in STEPS:
        result = run_step(demo, step)
        actual = demo.as_documented(result.stdout)
        assert result.returncode == step.exit_code, (
            f"{step.label()}: exit {result.returncode}, documented {step.exit_code}\n"
            f"{demo.rewrite(step.command)}\n{result.stdout}"
        )
        problems = compare_output(step, actual)
        assert not problems, f"{step.label()}:\n{demo.rewrite(step.command)}\n" + "\n".join(problems)


def test_the_comparison_catches_a_renamed_field_and_a_changed_value() -> None:
    documented = '{"summary": {"row_count": "3", "next": {}}, "created_at": "2026-01-01T00:00:00Z"}'
    assert compare_json(json_messages(documented), json_messages(
        '{"summary": {"row_count": "3", "next": {}}, "created_at": "2027-05-05T10:00:00.5Z"}')) == []
    assert compare_json(json_messages(documented), json_messages(
        '{"summary": {"rowCount": "3", "next": {}}, "created_at": "2026-01-01T00:00:00Z"}'))
    assert compare_json(json_messages(documented), json_messages(
        '{"summary": {"row_count": "4", "next": {}}, "created_at": "2026-01-01T00:00:00Z"}'))


# --- refreshing the documented outputs -----------------------------------------------------------------

def write_outputs(temp: Path) -> None:
    """Run the guide against a fresh demo and write what each command printed (and its exit) into it."""
    text = GUIDE.read_text()
    running, proc = start_demo(temp / "demo")
    replacements: list[tuple[tuple[int, int], str]] = []
    try:
        for step in parse_guide(text):
            started = time.monotonic()
            result = run_step(running, step)
            output = running.as_documented(result.stdout)
            language = step.language
            info = language + (f" exit={result.returncode}" if result.returncode else "")
            body = output if output.endswith("\n") or not output else output + "\n"
            replacements.append((step.output_span, f"```{info}\n{body}```"))
            print(f"line {step.line}: exit {result.returncode} in {time.monotonic() - started:.1f} s", flush=True)
    finally:
        stop_demo(running, proc)
    for (start, end), block in reversed(replacements):
        text = text[:start] + block + text[end:]
    GUIDE.write_text(text)


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.e2e.test_operator_guide --write")
    with tempfile.TemporaryDirectory() as temp:
        write_outputs(Path(temp))
