"""bamcountd against samtools on the same URL (a loopback http server), in one run: medians, ratios.

Serves benchmarks/data/ with devtools/object_server.py (Range requests, ETag, Last-Modified)
on 127.0.0.1 and counts the benchmark CRAM (made by bench_cram.py, cached) and a BAM of the
same reads (made from it once, cached) through http://127.0.0.1:PORT/..., with no filters and
with ``-F 0x904 -q 20``:

- ``samtools view -c URL`` and ``samtools view -c -@N URL`` with samtools' own defaults (on the
  CRAM, every field decoded, the reference given with ``-T``),
- ``bamcountd count URL`` (the CLI, Python start-up, the probe and the index fetch included).

The server runs in this process, on the same cores, for every command alike; loopback has no
latency, so this measures what the counts cost, not what a network would add.

    .venv/bin/python benchmarks/bench_url.py [--reads 2000000] [--repeats 3]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_cram import FILTERS, SAMTOOLS, setup, timed, total_of  # this folder is sys.path[0]

from devtools.object_server import serve

HERE = Path(__file__).resolve().parent


def make_bam(cram: Path, fasta: Path) -> Path:
    bam = cram.with_suffix(".bam")
    if not (bam.is_file() and Path(f"{bam}.bai").is_file()):
        partial = bam.with_name(f".{bam.name}.part")
        subprocess.run([SAMTOOLS, "view", "-@2", "-b", "-T", str(fasta), "-o", str(partial), str(cram)], check=True)
        partial.rename(bam)
        subprocess.run([SAMTOOLS, "index", str(bam)], check=True)
    return bam


def main() -> int:
    args, crams, cores = setup(__doc__)
    if len(crams) != 1:
        raise SystemExit("bench_url.py takes one --reads")
    [(cram, fasta)] = crams
    bam = make_bam(cram, fasta)
    with tempfile.TemporaryDirectory(prefix="bench-url-") as scratch, serve(HERE / "data") as server:
        # samtools runs in a folder of its own: it drops the index it downloads where it runs.
        env = {**os.environ, "REF_PATH": f"{scratch}/none/%s", "XDG_CACHE_HOME": scratch}
        work = Path(scratch) / "work"
        work.mkdir()
        print(f"# loopback http, {cores} cores, {args.repeats} rounds; {args.reads[0]} reads")
        for path in (bam, cram):
            url = server.url(path.name)
            reference = ["-T", str(fasta)] if path.suffix == ".cram" else []
            for label, (filters, _) in FILTERS.items():
                commands = {
                    "samtools view -c": [SAMTOOLS, "view", "-c", *reference, *filters, url],
                    f"samtools view -c -@{cores}": [SAMTOOLS, "view", "-c", f"-@{cores}", *reference, *filters, url],
                    "bamcountd count": [sys.executable, "-m", "bamcountd", "count", url, "--format", "json", *filters],
                }
                times: dict[str, list[float]] = {name: [] for name in commands}
                answers: dict[str, int] = {}
                for _ in range(args.repeats):
                    for name, argv in commands.items():
                        seconds, out = timed(argv, env, cwd=work)
                        times[name].append(seconds)
                        answers[name] = total_of(out) if name.startswith("bamcountd") else int(out)
                if len(set(answers.values())) != 1:
                    raise SystemExit(f"counts differ: {answers}")
                base = statistics.median(times[f"samtools view -c -@{cores}"])
                size = path.stat().st_size >> 20
                print(f"\n## {path.suffix[1:].upper()} ({size} MiB), {label} (count {answers['bamcountd count']})")
                for name, values in times.items():
                    median = statistics.median(values)
                    shown = " ".join(f"{v:.3f}" for v in values)
                    print(f"{name:28s} median {median:6.3f} s  ({shown})  x{median / base:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
