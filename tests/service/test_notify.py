"""The systemd notify protocol, read from the test's own NOTIFY_SOCKET."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.service.helpers import drop_by_rename, result_path
from tests.support.daemon import Daemons, Folders
from tests.support.waiting import wait_for


@pytest.mark.timeout(60)
def test_ready_status_watchdog_stopping(templates: list[Path], folders: Folders, daemons: Daemons) -> None:
    daemon = daemons.start(env={"WATCHDOG_USEC": "400000"})  # waits for READY=1
    assert daemon.notify is not None and daemon.process is not None
    first = daemon.notify.messages[0].split("\n")
    assert "READY=1" in first and f"MAINPID={daemon.process.pid}" in first
    assert any(field.startswith("STATUS=0 queued, 0 running, 0 done") for field in first)

    drop_by_rename(templates[0], folders.watch / "a.bam")
    wait_for(result_path(folders, "a.bam").exists, timeout=30, what="a result", context=daemon.log)
    wait_for(
        lambda: any(f.startswith("STATUS=") and "1 done" in f for f in daemon.notify.fields()),  # type: ignore[union-attr]
        timeout=10,
        what="STATUS with 1 done",
    )
    # WATCHDOG=1 every half WATCHDOG_USEC (0.2 s), from the scheduler loop.
    before = daemon.notify.fields().count("WATCHDOG=1")
    wait_for(
        lambda: daemon.notify.fields().count("WATCHDOG=1") >= before + 3,  # type: ignore[union-attr]
        timeout=5,
        what="watchdog pings",
    )
    daemon.signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=15) == 0
    fields = daemon.notify.fields()
    assert "STOPPING=1" in fields
    assert fields.index("READY=1") < fields.index("STOPPING=1")
    assert "READY=1" not in fields[fields.index("STOPPING=1") :]
