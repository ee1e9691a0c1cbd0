"""The few lines of the systemd notify protocol both processes need (Type=notify).

READY=1 once the process serves, RELOADING=1 / READY=1 around an agent's reload,
STOPPING=1 on shutdown, STATUS=... for `systemctl status`, and WATCHDOG=1
from the event loop, so a wedged loop gets the service restarted. Each is
one datagram to $NOTIFY_SOCKET; without it (not under systemd) they are no-ops.
Shared by the agent and the control plane, so it lives with the other shared parts.
"""

from __future__ import annotations

import asyncio
import os
import socket


def notify(*lines: str) -> bool:
    """Send `KEY=value` lines to systemd; False when not running under it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        # Never block the event loop: a reader that lags (its queue holds only a few datagrams)
        # costs a lost notification, not a wedged agent.
        try:
            sock.sendto("\n".join(lines).encode(), socket.MSG_DONTWAIT, address)
        except (BlockingIOError, ConnectionRefusedError, FileNotFoundError):
            return False
    return True


def watchdog_interval() -> float | None:
    """Half the watchdog timeout systemd set for this process, in seconds, or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1_000_000 / 2


async def keep_watchdog_fed(interval: float) -> None:
    """Ping the watchdog from the event loop for as long as the loop runs freely."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
