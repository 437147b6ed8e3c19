"""A real ``bamcountd serve`` process for the service tests (the ``daemon`` fixture of
tests/service/conftest.py starts them), its folders and its own ``NOTIFY_SOCKET``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Folders:
    watch: Path
    results: Path
    state: Path

    @classmethod
    def under(cls, base: Path) -> Folders:
        folders = cls(base / "watch", base / "results", base / "state")
        for folder in (folders.watch, folders.results, folders.state):
            folder.mkdir(parents=True, exist_ok=True)
        return folders


class NotifySocket:
    """The test's own ``NOTIFY_SOCKET``: a thread collects every datagram the daemon sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(path))
        self._socket.settimeout(0.1)
        self._lock = threading.Lock()
        self._messages: list[str] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._socket.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._messages.append(data.decode())

    @property
    def messages(self) -> list[str]:
        with self._lock:
            return list(self._messages)

    def fields(self) -> list[str]:
        return [line for message in self.messages for line in message.split("\n")]

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=2)
        self._socket.close()
        shutil.rmtree(self.path.parent, ignore_errors=True)


@dataclass
class Daemon:
    """``bamcountd serve`` in its own session (so a test can kill it and all its children)."""

    folders: Folders
    extra: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    notify: NotifySocket | None = None
    starts: int = 0

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "bamcountd",
            "serve",
            "--watch",
            str(self.folders.watch),
            "--results",
            str(self.folders.results),
            "--state",
            str(self.folders.state),
            "--settle",
            "0.5",
            "--rescan-interval",
            "2",
            "--log-format",
            "json",
            *self.extra,
        ]

    def start(self, *, wait_ready: bool = True) -> Daemon:
        self.starts += 1
        tag = f"{id(self):x}-{self.starts}"
        self.log_path = self.folders.state.parent / f"daemon-{tag}.log"
        if self.notify is not None:
            self.notify.close()
        # A short path: unix socket names are limited to 107 bytes.
        self.notify = NotifySocket(Path(tempfile.mkdtemp(prefix="bcd-notify-")) / "sock")
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify.path), **self.env}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
            )
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        def ready() -> bool:
            assert self.notify is not None
            return "READY=1" in self.notify.fields() or self.exited()

        wait_for(ready, timeout=timeout, what="READY=1")
        assert not self.exited(), self.log()

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def events(self) -> list[dict[str, Any]]:
        """The daemon's JSON log lines so far; a line still being written is left for later."""
        complete = self.log().split("\n")[:-1]
        return [json.loads(line) for line in complete if line.startswith("{")]

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout: float = 30) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill9(self, *, group: bool = False) -> None:
        """A crash: SIGKILL the daemon (``group``: with its children, as systemd kills a cgroup)."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(self.process.pid, signal.SIGKILL)
            else:
                self.process.kill()
        self.process.wait(10)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill9(group=True)
        if self.notify is not None:
            self.notify.close()


class Daemons:
    """The daemons of one test (the service tests' ``daemons`` fixture): started on the test's
    folders; any still running at its end are killed with their children."""

    def __init__(self, folders: Folders) -> None:
        self.folders = folders
        self._started: list[Daemon] = []

    def start(self, extra: Sequence[str] = (), env: dict[str, str] | None = None) -> Daemon:
        """``bamcountd serve`` with ``extra`` options, once it has said READY=1."""
        daemon = Daemon(self.folders, extra=extra, env=dict(env or {}))
        self._started.append(daemon)
        return daemon.start()

    def close(self) -> None:
        for daemon in self._started:
            daemon.close()
