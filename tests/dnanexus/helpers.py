"""Shared helpers of the DNAnexus tests: expected outputs from the oracle, runners, subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from bamcountd.count import CountRequest
from bamcountd.dnanexus.platform import Platform
from bamcountd.dnanexus.state import LAUNCHED, RETRY, Ledger
from bamcountd.dnanexus.watch import Runner, WatchConfig
from tests.bams import header_names, oracle, samtools_count
from tests.dnanexus_emulator import Emulator


def seed_text(bam: Path, filters: tuple[str, ...] = ()) -> str:
    """The seed applet's count_file for ``bam``, every number from ``samtools view -c``."""
    names = [*header_names(bam), "*"]
    counts = oracle(bam, names, filters)
    return (
        "".join(f"Region {name}: {counts[name]}\n" for name in names) + f"Total reads: {samtools_count(bam, *filters)}"
    )


def make_runner(emulator: Emulator, state: Path, *, applet: str | None, **options: object) -> Runner:
    settings: dict[str, object] = {"poll": 0.2, "api_retries": 1, "page_size": 2, "max_attempts": 3}
    settings.update(options)
    config = WatchConfig(
        project=emulator.project,
        folder="/incoming",
        results_folder="/counts",
        state=state,
        applet=applet,
        local_request=lambda bam, index: CountRequest(bam=bam, index=index, index_cache=state / "index-cache"),
        **settings,  # type: ignore[arg-type]
    )
    return Runner(config, Ledger(state / "dx-watch.sqlite"), Platform(api_retries=config.api_retries))


def settle(runner: Runner, emulator: Emulator, *, timeout: float = 100) -> None:
    """Poll until no BAM has a job in flight or a retry pending."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runner.poll_once()
        emulator.wait_for_jobs()
        if not any(entry.status in (LAUNCHED, RETRY) for entry in runner.ledger.all()):
            runner.poll_once()  # a last look: nothing new may start
            return
    raise TimeoutError("the runner did not settle")


def watch_command(emulator: Emulator, state: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bamcountd",
        "dx-watch",
        "--project",
        emulator.project,
        "--folder",
        "/incoming",
        "--results-folder",
        "/counts",
        "--state",
        str(state),
        "--poll",
        "0.2",
        "--api-retries",
        "1",
        "--log-format",
        "json",
        "--log-level",
        "info",
        *extra,
    ]


def watch_env(emulator: Emulator, tmp_path: Path, *, token: str | None = None) -> dict[str, str]:
    return {**os.environ, **emulator.env(token=token), "DX_USER_CONF_DIR": str(tmp_path / "dx-config")}


def run_watch(emulator: Emulator, tmp_path: Path, state: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        watch_command(emulator, state, *extra),
        env=watch_env(emulator, tmp_path),
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
