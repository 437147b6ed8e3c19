"""systemd's notify protocol (``Type=notify``): datagrams to the ``NOTIFY_SOCKET`` unix socket.

``READY=1`` once the daemon serves, ``STATUS=...`` for ``systemctl status``, ``WATCHDOG=1``
from the scheduler loop (at half of ``WATCHDOG_USEC``, so a stuck loop gets killed) and
``STOPPING=1`` on shutdown.  Without ``NOTIFY_SOCKET`` every call does nothing.  A failed send
is logged, never raised: the protocol is advisory and must not stop the counting.
"""

from __future__ import annotations

import os
import socket
import time

import structlog

log = structlog.get_logger("bamcountd.service")


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # "@name" is a socket in the abstract namespace, spelt with a leading NUL.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        applies = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        self.watchdog_interval: float | None = int(usec) / 2e6 if applies else None
        self._last_watchdog = 0.0
        self._last_status: str | None = None
        self._failing = False

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, *fields: str) -> None:
        if self._socket is None:
            return
        try:
            # Never block the scheduler loop on a receiver that does not read.
            self._socket.sendto("\n".join(fields).encode(), socket.MSG_DONTWAIT, self._address)
        except OSError as error:
            if not self._failing:  # once per outage, not once per tick
                log.warning("notify_failed", socket=self._address.replace("\0", "@"), error=error.strerror)
            self._failing = True
        else:
            self._failing = False

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        """Send ``STATUS=`` when it has changed."""
        if status != self._last_status:
            self._last_status = status
            self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        """Pet the watchdog if it is due; call as often as you like."""
        if self.watchdog_interval is None:
            return
        now = time.monotonic()
        if now - self._last_watchdog >= self.watchdog_interval:
            self._last_watchdog = now
            self.send("WATCHDOG=1")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
