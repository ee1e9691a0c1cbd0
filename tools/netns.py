"""Real Linux network namespaces for the network tests: isolated sites, veth
links, firewalls and proxies, all torn down afterwards.

    with NetLab() as lab:
        site = lab.namespace("site")
        link = lab.link(site)                      # root 10.a.b.1  <->  site 10.a.b.2
        site.iptables("-A", "INPUT", "-j", "DROP")  # only inside the namespace
        proc = lab.popen(site, ["sleep", "60"])     # killed on exit

Names are unique (`onp-<random>-<role>-p<test pid>`) so that concurrent test
runs never clash (a new lab deletes those of test processes that died); every address comes from a random private 10.x.y.0/24 that no route of
the host overlaps. The host's own iptables rules are never touched: every
`iptables` call runs inside a namespace. On exit, processes are killed (the
ones this lab started, then any left in its namespaces), the namespaces are
deleted (which deletes their veth ends) and the root ends are deleted too.

Needs root, `ip` (iproute2) and `iptables`; `require()` says why when not.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO


def missing() -> str | None:
    """Why namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (tools/setup_system.sh installs it)"
    return None


def require() -> None:
    """Skip the calling test when namespaces are unavailable, except in CI, where that is a failure."""
    import pytest

    reason = missing()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run the network tests: {reason}")
    pytest.skip(reason)


def run(args: Sequence[str], *, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited with {out.returncode}: {out.stderr.strip() or out.stdout.strip()}")
    return out


def _host_networks() -> list[ipaddress.IPv4Network]:
    nets: list[ipaddress.IPv4Network] = []
    for line in run(["ip", "-4", "-o", "route", "show", "table", "all"]).stdout.splitlines():
        parts = line.split()
        route_types = {"local", "broadcast", "unicast", "anycast", "multicast", "unreachable", "blackhole", "prohibit"}
        if parts and parts[0] in route_types:
            parts = parts[1:]
        dest = parts[0] if parts else "default"
        if dest == "default":
            continue
        try:
            nets.append(ipaddress.IPv4Network(dest, strict=False))
        except ValueError:
            continue
    for line in run(["ip", "-4", "-o", "addr", "show"]).stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append(ipaddress.IPv4Network(parts[parts.index("inet") + 1], strict=False))
    return nets


def free_subnet(taken: Sequence[ipaddress.IPv4Network] = ()) -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that overlaps nothing the host routes or already uses."""
    used = [*_host_networks(), *taken]
    for _ in range(200):
        net = ipaddress.IPv4Network(f"10.{random.randint(100, 250)}.{random.randint(0, 255)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free 10.x.y.0/24 found for a test network")


@dataclass
class Namespace:
    """A named network namespace (`ip netns`); its loopback is up from the start."""

    name: str

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return run([*self.prefix(), *args], check=check, timeout=timeout)

    def sysctl(self, key: str, value: str) -> None:
        """Set a sysctl of this namespace (/proc/sys/net is per namespace), e.g. ("net.ipv4.ip_forward", "0")."""
        path = "/proc/sys/" + key.replace(".", "/")
        self.run("sh", "-c", f'echo "$1" > {path}', "sh", value)

    def iptables(self, *rule: str) -> None:
        """One iptables command inside this namespace, never on the host."""
        self.run("iptables", "-w", *rule)

    def packets(self, chain: str, target: str) -> int:
        """Packets matched so far by the rules of `chain` that jump to `target` (e.g. INPUT, DROP)."""
        out = self.run("iptables", "-w", "-L", chain, "-v", "-n", "-x").stdout
        rows = [line.split() for line in out.splitlines()[2:]]
        return sum(int(row[0]) for row in rows if len(row) > 2 and row[2] == target)

    def deny_inbound(self) -> None:
        """The site firewall: replies and loopback in, every NEW inbound connection dropped."""
        self.iptables("-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
        self.iptables("-A", "INPUT", "-i", "lo", "-j", "ACCEPT")
        self.iptables("-A", "INPUT", "-j", "DROP")

    def allow_outbound_only_to(self, address: str, port: int) -> None:
        """Outbound traffic only to `address:port` (and loopback); everything else is rejected at once."""
        self.iptables("-A", "OUTPUT", "-o", "lo", "-j", "ACCEPT")
        self.iptables("-A", "OUTPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
        self.iptables("-A", "OUTPUT", "-p", "tcp", "-d", address, "--dport", str(port), "-j", "ACCEPT")
        self.iptables("-A", "OUTPUT", "-j", "REJECT")

    def pids(self) -> list[int]:
        out = run(["ip", "netns", "pids", self.name], check=False).stdout
        return [int(p) for p in out.split() if p.isdigit()]

    def tcp_connects(self, host: str, port: int, timeout: float = 2.0) -> str:
        """Try a TCP connection from inside this namespace: "connected", "timeout" or the OS error's name."""
        return probe_tcp(host, port, timeout, namespace=self)


def probe_tcp(host: str, port: int, timeout: float = 2.0, namespace: Namespace | None = None) -> str:
    """Try a TCP connection (from the root namespace, or from inside `namespace`).

    Returns "connected", "timeout" (the SYN was dropped), or the errno name
    ("ECONNREFUSED", "ENETUNREACH", ...).
    """
    if namespace is None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return "connected"
        except TimeoutError:
            return "timeout"
        except OSError as exc:
            return errno.errorcode.get(exc.errno or 0, str(exc))
    code = (
        "import errno, socket, sys\n"
        "try:\n"
        f"    socket.create_connection(({host!r}, {port}), timeout={timeout}).close(); print('connected')\n"
        "except TimeoutError: print('timeout')\n"
        "except OSError as e: print(errno.errorcode.get(e.errno or 0, str(e)))\n"
    )
    return namespace.run(sys.executable, "-c", code, timeout=timeout + 10).stdout.strip()


@dataclass(frozen=True)
class Link:
    """A veth pair: `a_address` on the `a` side, `b_address` on the `b` side, in one /24."""

    a: Namespace | None
    b: Namespace
    a_dev: str
    b_dev: str
    network: ipaddress.IPv4Network
    a_address: str
    b_address: str


@dataclass
class NetLab:
    """Namespaces, links and processes of one test, all removed by `close()`."""

    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    namespaces: list[Namespace] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _devices: int = 0

    def __post_init__(self) -> None:
        reap_stale()

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def namespace(self, role: str) -> Namespace:
        ns = Namespace(f"onp-{self.tag}-{role}-p{os.getpid()}")
        run(["ip", "netns", "add", ns.name])
        self.namespaces.append(ns)
        ns.run("ip", "link", "set", "lo", "up")
        return ns

    def link(self, b: Namespace, a: Namespace | None = None) -> Link:
        """A veth pair between `a` (default: the root namespace) and `b`, on a fresh /24: a is .1, b is .2."""
        network = free_subnet([link.network for link in self.links])
        self._devices += 1
        a_dev, b_dev = f"onp{self.tag}a{self._devices}", f"onp{self.tag}b{self._devices}"  # <= 15 characters
        a_addr, b_addr = str(network.network_address + 1), str(network.network_address + 2)
        run(["ip", "link", "add", a_dev, "type", "veth", "peer", "name", b_dev])
        link = Link(a, b, a_dev, b_dev, network, a_addr, b_addr)
        self.links.append(link)
        run(["ip", "link", "set", b_dev, "netns", b.name])
        if a is not None:
            run(["ip", "link", "set", a_dev, "netns", a.name])
        for ns, dev, addr in ((a, a_dev, a_addr), (b, b_dev, b_addr)):
            prefix = ns.prefix() if ns else []
            run([*prefix, "ip", "addr", "add", f"{addr}/{network.prefixlen}", "dev", dev])
            run([*prefix, "ip", "link", "set", dev, "up"])
        return link

    def popen(self, ns: Namespace | None, args: Sequence[str], *, log: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start `args` inside `ns` (None: the root namespace); output goes to `log`. Killed by `close()`."""
        prefix = ns.prefix() if ns else []
        out: IO[bytes] | int = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
        try:
            proc = subprocess.Popen([*prefix, *args], stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})})
        finally:
            if not isinstance(out, int):
                out.close()
        self.processes.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.processes):
            stop_process(proc)
        for ns in self.namespaces:
            # Anything still inside (a server's children, say) would keep the namespace alive.
            for pid in ns.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            run(["ip", "netns", "del", ns.name], check=False)
        for link in self.links:
            if link.a is None:  # the root end: usually gone with its peer already
                run(["ip", "link", "del", link.a_dev], check=False)
        self.processes.clear()
        self.namespaces.clear()
        self.links.clear()


def reap_stale() -> None:
    """Delete the namespaces (and kill their processes) left by labs whose test process died
    without cleaning up (SIGKILL, say): those named `onp-...-p<pid>` for a pid that no longer runs."""
    for line in run(["ip", "netns", "list"], check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        owner = name.rpartition("-p")[2]
        if not name.startswith("onp-") or not owner.isdigit() or Path(f"/proc/{owner}").exists():
            continue
        ns = Namespace(name)
        for pid in ns.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        run(["ip", "netns", "del", name], check=False)


def stop_process(proc: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGTERM, timeout: float = 10) -> int:
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def wait_for_tcp(host: str, port: int, proc: subprocess.Popen[bytes], namespace: Namespace | None = None,
                 timeout: float = 20) -> None:
    """Wait until something accepts on host:port (seen from `namespace`), or fail if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening on {host}:{port}")
        if probe_tcp(host, port, 0.5, namespace) == "connected":
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listened on {host}:{port} within {timeout} s")


@dataclass
class Tinyproxy:
    """A tinyproxy HTTP CONNECT proxy with basic auth, in a namespace of a `NetLab`."""

    lab: NetLab
    namespace: Namespace | None
    listen: str
    folder: Path
    username: str
    password: str
    port: int = 8888
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.listen}:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.folder / "tinyproxy.log"

    def start(self) -> None:
        binary = shutil.which("tinyproxy") or next(
            (p for p in ("/usr/bin/tinyproxy", "/usr/sbin/tinyproxy") if Path(p).exists()), None)
        if binary is None:
            raise RuntimeError("tinyproxy is not installed (tools/setup_system.sh installs it)")
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "tinyproxy.conf"
        # No ConnectPort line: CONNECT to any port. No Allow line: any client. LogLevel Info
        # records each client, its CONNECT line and the upstream connection it opens.
        config.write_text(
            f"Port {self.port}\nListen {self.listen}\nTimeout 60\nMaxClients 50\n"
            f'LogFile "{self.log_file}"\nLogLevel Info\n'
            f"BasicAuth {self.username} {self.password}\n"
        )
        self.proc = self.lab.popen(self.namespace, [binary, "-d", "-c", str(config)],
                                   log=self.folder / "tinyproxy.out")
        wait_for_tcp(self.listen, self.port, self.proc, self.namespace)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
