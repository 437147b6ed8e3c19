"""Load benchmark for ``bamcountd serve``: N small BAMs dropped at once.

Prints files/minute (from the drop to the last result), the daemon's peak RSS (VmHWM) and the
largest peak RSS among the processes it ran (samtools), and checks that every BAM was counted
exactly once and correctly (against ``samtools view -c`` on the template it was copied from).

    .venv/bin/python benchmarks/bench_service.py --files 500
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bamcountd.synth import Reference, random_records, write_bam

SAMTOOLS = shutil.which("samtools") or "samtools"


def make_templates(folder: Path, count: int) -> list[Path]:
    references = [Reference("chr1", 200_000), Reference("chr2", 100_000), Reference("chrM", 16_569)]
    return [
        write_bam(
            folder / f"template{i}.bam",
            references,
            random_records(references, 2_000 + 500 * i, unplaced=50, read_length=100, seed=i),
        )
        for i in range(count)
    ]


def oracle(bam: Path) -> dict[str, int]:
    names = [line.split("\t")[0] for line in _run(SAMTOOLS, "idxstats", str(bam)).splitlines()]
    return {
        name: int(_run(SAMTOOLS, "view", "-c", str(bam), name if name == "*" else "{" + name + "}")) for name in names
    }


def _run(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=500)
    parser.add_argument("--templates", type=int, default=5)
    parser.add_argument("--max-files", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=1800, help="give up after SECONDS")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-service-") as scratch:
        base = Path(scratch)
        watch, results, state, staging = (base / name for name in ("watch", "results", "state", "staging"))
        for folder in (watch, results, state, staging):
            folder.mkdir()
        templates = make_templates(base, args.templates)
        expected = {template: oracle(template) for template in templates}
        source_of: dict[str, Path] = {}
        for i in range(args.files):
            name = f"sample{i:04d}.bam"
            template = templates[i % len(templates)]
            shutil.copyfile(template, staging / name)
            source_of[name] = template

        log_path = base / "daemon.log"
        argv = [sys.executable, "-m", "bamcountd", "serve", "--watch", str(watch), "--results", str(results)]
        argv += ["--state", str(state), "--settle", "1", "--max-files", str(args.max_files), "--jobs", str(args.jobs)]
        argv += ["--log-format", "json"]
        with open(log_path, "wb") as log:
            daemon = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            time.sleep(2)  # started and watching
            dropped = time.monotonic()
            for name in source_of:
                os.replace(staging / name, watch / name)  # all at once, each atomically
            deadline = dropped + args.timeout
            while len(list(results.glob("*.counts.json"))) < args.files:
                if time.monotonic() > deadline or daemon.poll() is not None:
                    print(
                        f"gave up: {len(list(results.glob('*.counts.json')))} of {args.files} results", file=sys.stderr
                    )
                    return 1
                time.sleep(0.2)
            elapsed = time.monotonic() - dropped
            daemon_peak = peak_rss_kib(daemon.pid)
        finally:
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(60)
        children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux

        done = Counter(
            json.loads(line)["file"]
            for line in log_path.read_text().splitlines()
            if line.startswith("{") and json.loads(line).get("event") == "done"
        )
        wrong = [
            name
            for name, template in source_of.items()
            if {
                r["region"]: r["count"]
                for r in json.loads((results / (name[:-4] + ".counts.json")).read_text())["regions"]
            }
            != expected[template]
        ]
        once = all(count == 1 for count in done.values()) and len(done) == args.files
        print(
            f"files:               {args.files} ({args.templates} distinct contents, {templates[0].stat().st_size} B to {templates[-1].stat().st_size} B)"
        )
        print(f"max-files / jobs:    {args.max_files} / {args.jobs} on {os.cpu_count()} cores")
        print(f"wall time:           {elapsed:.1f} s from drop to last result")
        print(f"throughput:          {args.files / elapsed * 60:.0f} files/minute")
        print(f"daemon peak RSS:     {daemon_peak / 1024:.1f} MiB")
        print(f"largest child RSS:   {children_peak / 1024:.1f} MiB (the daemon or one samtools)")
        print(f"counted exactly once: {once}; wrong counts: {len(wrong)}; daemon exit status: {code}")
        return 0 if once and not wrong and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
