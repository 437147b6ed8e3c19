"""The applet's scatter against the local DNAnexus emulator: wall time and bytes read from the
platform, single job and scatter, stream and download, with ``samtools view -c`` on the same file.

Run: .venv/bin/python benchmarks/bench_scatter.py [--reads R] [--scatter-jobs N]
Each job is a subprocess running the real applet, as the emulator runs jobs, and its subjobs
run on this same machine, so the times measure bamcountd's own work and job start-ups, not
DNAnexus' workers; the bytes served are what a platform would send.  One JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dxpy  # type: ignore[import-untyped]

from bamcountd import logs
from bamcountd.synth import tricky_bam
from devtools.dnanexus_emulator import Emulator

APPLET = Path(__file__).resolve().parents[1] / "dnanexus" / "bamcount"


def samtools_count(bam: Path) -> tuple[float, int]:
    """``samtools view -c -@2``: its wall seconds and its count."""
    started = time.monotonic()
    completed = subprocess.run(["samtools", "view", "-c", "-@2", str(bam)], check=True, capture_output=True)
    return time.monotonic() - started, int(completed.stdout)


def measure(bam: Path, work: Path, *, mode: str, scatter: bool, scatter_jobs: int) -> dict[str, object]:
    name = f"{mode}-{'scatter' if scatter else 'single'}"
    with Emulator(work / name) as api:
        dxpy.set_api_server_info(host="127.0.0.1", port=api.port, protocol="http")
        dxpy.set_security_context({"auth_token_type": "Bearer", "auth_token": api.token})
        dxpy.set_workspace_id(api.project)
        api.job_env = {"XDG_CACHE_HOME": str(work / name / "job-cache")}
        spec = json.loads((APPLET / "dxapp.json").read_text())
        applet = api.add_applet("bamcount", spec, APPLET / spec["runSpec"]["file"])
        bam_id = api.add_file(bam.name, bam.read_bytes())
        index_id = api.add_file(f"{bam.name}.bai", Path(f"{bam}.bai").read_bytes())
        job_input = {
            "mappings_bam": dxpy.dxlink(bam_id),
            "index_file": dxpy.dxlink(index_id),
            "input_mode": mode,
            "scatter": scatter,
            "scatter_jobs": scatter_jobs,
        }
        started = time.monotonic()
        job = dxpy.DXApplet(applet).run(job_input, folder="/results", project=api.project, name=name)
        api.wait_for_jobs(timeout=1200)
        seconds = time.monotonic() - started
        done = api.jobs[job.get_id()]
        subjobs = sum(1 for j in api.jobs.values() if j.function == "count_shards")
        return {
            "run": name,
            "state": done.state,
            "subjobs": subjobs,
            "seconds": round(seconds, 2),
            "bam_bytes": bam.stat().st_size,
            "served_x_bam": round(api.served.get(bam_id, 0) / bam.stat().st_size, 3),
            "total": None if done.output is None else done.output.get("total_reads"),
        }


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=1_000_000)
    parser.add_argument("--scatter-jobs", type=int, default=4)
    return parser.parse_args()


def main() -> None:
    args = _arguments()
    logs.configure(level="warning")
    with tempfile.TemporaryDirectory(prefix="bench-scatter-") as scratch:
        bam = tricky_bam(Path(scratch) / "bams", reads=args.reads, seed=11, name="big.bam")
        work = Path(scratch)
        reference, count = samtools_count(bam)
        print(json.dumps({"run": "samtools view -c -@2", "seconds": round(reference, 2), "total": count}))
        for mode in ("stream", "download"):
            for scatter in (False, True):
                row = measure(bam, work, mode=mode, scatter=scatter, scatter_jobs=args.scatter_jobs)
                row["x_samtools"] = round(float(row["seconds"]) / reference, 2)  # type: ignore[arg-type]
                row["exact"] = row["total"] == count
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
