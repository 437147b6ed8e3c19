"""A dx-watch runner against the emulator, and polling it until nothing is left in flight."""

from __future__ import annotations

import time
from pathlib import Path

from bamcountd.dnanexus.platform import Platform
from bamcountd.dnanexus.watch import Runner, WatchConfig
from bamcountd.ledger import Ledger
from bamcountd.options import CountOptions
from devtools.dnanexus_emulator import Emulator


def make_runner(emulator: Emulator, state: Path, *, applet: str | None, **options: object) -> Runner:
    settings: dict[str, object] = {"poll": 0.2, "api_retries": 1, "page_size": 2, "max_attempts": 3, "retry_delay": 0.0}
    settings.update(options)
    config = WatchConfig(
        project=emulator.project,
        folder="/incoming",
        results_folder="/counts",
        state=state,
        applet=applet,
        count=CountOptions(index_cache=state / "index-cache"),
        **settings,  # type: ignore[arg-type]
    )
    return Runner(config, Ledger.open(state / "dx-watch.sqlite", lock=False), Platform(api_retries=config.api_retries))


def settle(runner: Runner, emulator: Emulator, *, timeout: float = 100) -> None:
    """Poll until no BAM has a job in flight or a retry pending."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runner.poll_once()
        emulator.wait_for_jobs()
        if not any(entry.state in ("running", "failed") for entry in runner.ledger.entries()):
            runner.poll_once()  # a last look: nothing new may start
            return
    raise TimeoutError("the runner did not settle")
