"""Shared helpers of the DNAnexus tests: expected outputs from the oracle, runners, subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dxpy  # type: ignore[import-untyped]

from devtools.dnanexus_emulator import Emulator, Job
from tests.support.bams import header_names, oracle, samtools_count


def seed_text(bam: Path, filters: tuple[str, ...] = ()) -> str:
    """The seed applet's count_file for ``bam``, every number from ``samtools view -c``."""
    names = [*header_names(bam), "*"]
    counts = oracle(bam, names, filters)
    return (
        "".join(f"Region {name}: {counts[name]}\n" for name in names) + f"Total reads: {samtools_count(bam, *filters)}"
    )


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


def run_job(emulator: Emulator, applet: str, job_input: dict[str, object]) -> Job:
    """Run the applet through dxpy and wait for every job it starts."""
    job = dxpy.DXApplet(applet).run(job_input, folder="/results", name="bamcount test")
    emulator.wait_for_jobs()
    return emulator.jobs[job.get_id()]


def output_bytes(emulator: Emulator, job: Job, field: str) -> bytes:
    """The data of a job's file output."""
    assert job.output is not None
    return emulator.files[job.output[field]["$dnanexus_link"]].data
