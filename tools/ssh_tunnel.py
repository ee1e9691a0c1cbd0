"""An OpenSSH reverse tunnel (`ssh -R`), throwaway from end to end: what a user would pick instead of onprem.

    with reverse_tunnel(workdir, target_port=5432) as tunnel:
        psycopg.connect(host="127.0.0.1", port=tunnel.port, ...)

The "bastion" is OpenSSH's own server, started here on a free loopback port
with a config, a host key and an authorized key generated into `workdir`; the
"site" is `ssh -N -R PORT:TARGET` logging in to it with a key of its own, and
checking the host key against a known_hosts file written here. Nothing outside
`workdir` is read or written (no system sshd, nothing in /etc or ~/.ssh: the
client reads no config file and, given `-F`, does not create ~/.ssh), with one
exception: sshd run as root insists on its privilege separation directory
/run/sshd, which Debian makes when its service starts; when that is missing it
is made here, empty and root's, exactly as Debian's init script does.

Every process started here is stopped on the way out, failure or not: the
client, the server, and the server's per-connection children (which sshd
starts in sessions of their own, so that stopping the server alone would leave
them running).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tools.ports import free_port

__all__ = ["ReverseTunnel", "SshTunnelError", "children", "descendants", "reverse_tunnel", "running"]

#: sshd refuses to start from a relative path (it re-executes itself for every connection).
SSHD = Path("/usr/sbin/sshd")
#: What sshd run as root needs to exist (compiled in; Debian's service makes it at start).
_PRIVSEP_DIR = Path("/run/sshd")
_STOP_SECONDS = 5.0


class SshTunnelError(RuntimeError):
    """The server or the client did not start, or the forward was refused; the message holds their logs."""


@dataclass(frozen=True)
class ReverseTunnel:
    """A running `ssh -R`: connect to 127.0.0.1:`port` on the bastion to reach the target at the site."""

    port: int
    sshd_pid: int
    ssh_pid: int


def _program(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/sbin")
    if found is None:
        raise SshTunnelError(f"{name} is not installed: apt-get install openssh-client (make system-deps)")
    return found


def _keygen(path: Path) -> str:
    """A fresh ed25519 key pair at `path` (and `path`.pub); returns the public key as "type base64"."""
    subprocess.run([_program("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", "onprem-bench", "-f", str(path)],
                   check=True, capture_output=True)
    kind, blob, *_ = path.with_name(path.name + ".pub").read_text().split()
    return f"{kind} {blob}"


def _sshd_config(folder: Path, port: int, user: str) -> Path:
    config = folder / "sshd_config"
    config.write_text("\n".join([
        f"ListenAddress 127.0.0.1:{port}",
        f"HostKey {folder / 'host_key'}",
        f"PidFile {folder / 'sshd.pid'}",
        f"AuthorizedKeysFile {folder / 'authorized_keys'}",
        f"AllowUsers {user}",
        "AuthenticationMethods publickey",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        # No PAM: nothing of the system's login configuration takes part.
        "UsePAM no",
        # The files are in a temporary folder under /tmp, which is world-writable: StrictModes refuses that.
        "StrictModes no",
        # Only what `ssh -R` needs: the listening port on the bastion's loopback, no shell, no TTY.
        "AllowTcpForwarding remote",
        "GatewayPorts no",
        "AllowAgentForwarding no",
        "X11Forwarding no",
        "PermitTTY no",
        "PermitUserRC no",
        "PrintMotd no",
        "LogLevel INFO",
        "",
    ]))
    config.chmod(0o600)
    return config


def _ssh_options(folder: Path) -> list[str]:
    return [
        "-F", "none",  # no ~/.ssh/config nor /etc/ssh/ssh_config, and no ~/.ssh made
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={folder / 'known_hosts'}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "CheckHostIP=no",
        "-o", f"IdentityFile={folder / 'client_key'}",
        "-o", "IdentitiesOnly=yes",
        "-o", "IdentityAgent=none",
        "-o", "ExitOnForwardFailure=yes",
        # The only word that the forward is in place (debug1): that the port accepts could be another listener.
        "-o", "LogLevel=DEBUG1",
    ]


def _log(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip() or "(nothing logged)"
    except OSError:
        return "(no log)"


def _wait_for(proc: subprocess.Popen[bytes], what: str, log: Path, words: str, deadline: float) -> None:
    """Until `words` appear in the process's log; fails at once when it exits first."""
    while time.monotonic() < deadline:
        if words in _log(log):
            return
        if proc.poll() is not None:
            raise SshTunnelError(f"{what} exited with {proc.returncode}: {_log(log)}")
        time.sleep(0.02)
    raise SshTunnelError(f"{what} did not log {words!r} within its time: {_log(log)}")


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`, read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command name may hold spaces and parentheses: the fields after its last ')' are fixed.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    """Children, their children, and so on."""
    found, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def running(pid: int) -> bool:
    """Running: not gone, and not a zombie waiting for its parent."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def _stop_server(sshd: subprocess.Popen[bytes], sessions: list[int]) -> None:
    """The listener, and its per-connection children, which outlive it by design (sessions of their own)."""
    deadline = time.monotonic() + _STOP_SECONDS
    # Their client has gone: they end by themselves in a moment (and sshd reaps them); what is left
    # then is ended by its pid.
    while any(running(pid) for pid in sessions) and time.monotonic() < deadline:
        time.sleep(0.02)
    _stop(sshd)
    for pid in sessions:
        if running(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _ensure_privsep_dir() -> None:
    if os.geteuid() == 0 and not _PRIVSEP_DIR.is_dir():
        _PRIVSEP_DIR.mkdir(mode=0o755)


@contextmanager
def reverse_tunnel(workdir: Path, target_port: int, target_host: str = "127.0.0.1",
                   timeout: float = 15.0) -> Iterator[ReverseTunnel]:
    """Start sshd, then `ssh -N -R PORT:target_host:target_port` to it; stop both (and sshd's children) on exit."""
    if not SSHD.exists():
        raise SshTunnelError(f"{SSHD} is not installed: apt-get install openssh-server (make system-deps)")
    folder = workdir / "ssh"
    folder.mkdir(mode=0o700, parents=True)
    user = pwd.getpwuid(os.getuid()).pw_name
    host_key = _keygen(folder / "host_key")
    (folder / "authorized_keys").write_text(_keygen(folder / "client_key") + "\n")
    sshd_port, forwarded_port = free_port(), free_port()
    (folder / "known_hosts").write_text(f"[127.0.0.1]:{sshd_port} {host_key}\n")
    config = _sshd_config(folder, sshd_port, user)
    _ensure_privsep_dir()
    deadline = time.monotonic() + timeout
    sshd_log, ssh_log = folder / "sshd.log", folder / "ssh.log"
    with sshd_log.open("wb") as out:
        sshd = subprocess.Popen([str(SSHD), "-f", str(config), "-D", "-e"], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT)
    sessions: list[int] = []
    try:
        _wait_for(sshd, "sshd", sshd_log, f"Server listening on 127.0.0.1 port {sshd_port}.", deadline)
        with ssh_log.open("wb") as out:
            ssh = subprocess.Popen(
                [_program("ssh"), *_ssh_options(folder), "-N", "-p", str(sshd_port),
                 "-R", f"{forwarded_port}:{target_host}:{target_port}", f"{user}@127.0.0.1"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            try:
                _wait_for(ssh, "ssh -R", ssh_log, f"remote forward success for: listen {forwarded_port},", deadline)
            except SshTunnelError as exc:
                raise SshTunnelError(f"{exc}\nsshd's log: {_log(sshd_log)}") from None
            yield ReverseTunnel(port=forwarded_port, sshd_pid=sshd.pid, ssh_pid=ssh.pid)
        finally:
            sessions = descendants(sshd.pid)
            _stop(ssh)
    finally:
        _stop_server(sshd, sessions)
