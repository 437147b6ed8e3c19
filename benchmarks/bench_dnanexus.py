"""dx-watch throughput against the local DNAnexus emulator: BAMs per second and API calls per BAM.

Run: .venv/bin/python benchmarks/bench_dnanexus.py [--bams N] [--reads R]
It counts the same generated BAMs in --local mode and in applet mode (each job a subprocess
running the real applet, as the emulator runs jobs), and prints one line per mode.  The
numbers measure bamcountd's own overhead (polling, ledger, dxpy calls, job start-up), not
DNAnexus' workers or network.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dxpy  # type: ignore[import-untyped]

from bamcountd import logs
from bamcountd.synth import tricky_bam
from devtools.dnanexus_emulator import Emulator
from devtools.dx_runner import make_runner, settle

APPLET = Path(__file__).resolve().parents[1] / "dnanexus" / "bamcount"


def measure(mode: str, bams: list[Path], work: Path) -> dict[str, float | int | str]:
    with Emulator(work / mode) as api:
        dxpy.set_api_server_info(host="127.0.0.1", port=api.port, protocol="http")
        dxpy.set_security_context({"auth_token_type": "Bearer", "auth_token": api.token})
        api.job_env = {"XDG_CACHE_HOME": str(work / mode / "job-cache")}
        for bam in bams:
            api.add_file(bam.name, bam.read_bytes(), folder="/incoming")
        applet = None
        if mode == "applet":
            spec = json.loads((APPLET / "dxapp.json").read_text())
            applet = api.add_applet("bamcount", spec, APPLET / spec["runSpec"]["file"])
        runner = make_runner(api, work / mode / "state", applet=applet, page_size=100)
        started = time.monotonic()
        settle(runner, api, timeout=600)
        seconds = time.monotonic() - started
        results = len(api.files_in("/counts"))
        calls = len(api.calls)
    return {
        "mode": mode,
        "bams": len(bams),
        "results": results,
        "seconds": round(seconds, 2),
        "bams_per_second": round(len(bams) / seconds, 2),
        "api_calls_per_bam": round(calls / len(bams), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bams", type=int, default=6)
    parser.add_argument("--reads", type=int, default=20_000)
    args = parser.parse_args()
    logs.configure(level="warning")
    with tempfile.TemporaryDirectory(prefix="bench-dx-") as scratch:
        work = Path(scratch)
        bams = [
            tricky_bam(work / "bams", reads=args.reads, seed=seed, name=f"b{seed}.bam") for seed in range(args.bams)
        ]
        for mode in ("local", "applet"):
            print(json.dumps(measure(mode, bams, work)))


if __name__ == "__main__":
    main()
