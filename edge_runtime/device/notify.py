"""systemd's notify protocol (sd_notify(3)), spoken without libsystemd: a datagram per message.

Under the unit's ``Type=notify`` and ``WatchdogSec=``, systemd gives the daemon ``NOTIFY_SOCKET`` (a path, or
``@name`` in the abstract namespace) and ``WATCHDOG_USEC``. The daemon says ``READY=1`` once it drives the signal,
``STATUS=...`` whenever its mode, model or deploy state changes (what `systemctl status` shows), ``WATCHDOG=1``
from its decision loop and ``STOPPING=1`` when it shuts down. The pings come from the loop itself, never from a
thread of their own: a loop that hangs (a stuck actuator, a deadlock) must stop them, so systemd kills and restarts
the daemon. Sending never blocks (a full socket drops the message): a slow systemd must not stall the signal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

# Pings per watchdog interval: systemd asks for one every half interval; twice that, so a loop iteration that
# takes a while still gets one in before the half is over.
PINGS_PER_INTERVAL = 4


def socket_address(value: str) -> str | None:
    """``NOTIFY_SOCKET`` as ``sendto`` takes it: a path, or ``@name`` → the abstract ``\\0name``; None when unset
    or of a kind this daemon does not speak (systemd's ``vsock:`` addresses)."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between pings when systemd watches this process (``WATCHDOG_USEC``, and ``WATCHDOG_PID`` unset or
    ours, as sd_watchdog_enabled(3) reads them); None when it does not."""
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (owner and owner != str(pid)):
        return None
    return int(usec) / 1e6 / PINGS_PER_INTERVAL


class Notifier:
    """The daemon's messages to systemd; does nothing outside a ``Type=notify`` unit (no ``NOTIFY_SOCKET``)."""

    def __init__(self, environ: Mapping[str, str] = os.environ, clock: Callable[[], float] = time.monotonic):
        raw = environ.get("NOTIFY_SOCKET", "")
        self.address = socket_address(raw)
        if raw and self.address is None:
            log.warning("NOTIFY_SOCKET=%s is not a path or @name: systemd is not told READY or WATCHDOG", raw)
        self.interval = watchdog_interval(environ, os.getpid()) if self.address else None
        self.clock = clock
        self.last_ping = float("-inf")
        self.last_status = ""
        self.sock: socket.socket | None = None
        if self.address is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)

    def send(self, message: str) -> bool:
        """One datagram; False when it could not be sent (no systemd, a full or vanished socket)."""
        if self.sock is None or self.address is None:
            return False
        try:
            self.sock.sendto(message.encode(), self.address)
        except OSError as exc:
            log.debug("sd_notify %s: %s", message.split("=")[0], exc)
            return False
        return True

    def ready(self, status: str) -> None:
        self.last_status = status
        self.send(f"READY=1\nSTATUS={status}")

    def status(self, text: str) -> None:
        """``STATUS=text`` when it differs from the last one sent."""
        if text != self.last_status:
            self.last_status = text
            self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        """``WATCHDOG=1`` when the last ping is ``interval`` old: call it every iteration of the decision loop."""
        if self.interval is not None and self.clock() - self.last_ping >= self.interval:
            self.last_ping = self.clock()
            self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None
