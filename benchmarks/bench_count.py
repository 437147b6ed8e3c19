"""bamcountd against samtools, in one run: wall time, peak RSS, ratios.

Generates (once, cached in benchmarks/data/) a realistic BAM — random 150 bp reads with
qualities, ~25 human-like references plus unplaced reads — and a second BAM with the same
number of reads spread over 3,000+ references (25 chromosomes and thousands of small
GRCh38-like alt/decoy/HLA contigs).  Then runs, alternately and several times each:

- ``samtools view -c`` (1 thread) and ``samtools view -c -@N`` (N = cores),
- the seed design, benchmarks/seed_applet.py: one ``samtools view -c BAM REF`` per header
  reference, 10 at a time in a thread pool, in its own Python process like the DNAnexus
  tutorial applet (and, like it, without ``*``, so its total is short by the unplaced reads),
- ``bamcountd count`` (the CLI, Python start-up included),

with no filters and with ``-F 0x904 -q 20``, and prints medians and ratios.  ``--variant``
adds ``bamcountd count`` with other options to the same rounds (e.g. ``--variant "-j 16"``).

    .venv/bin/python benchmarks/bench_count.py [--reads 6000000] [--repeats 3]

The BAMs are generated in parallel, one process per chunk of references (each writes its own
BAM with the full header; ``samtools cat`` joins them in order).  ``BAMCOUNTD`` overrides the
command timed as bamcountd (default: this Python, ``-m bamcountd``).  bamcountd's bytecode is
compiled first, so that an environment with PYTHONDONTWRITEBYTECODE does not time compiling.
"""

from __future__ import annotations

import argparse
import compileall
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import bamcountd
from bamcountd.synth import HUMAN, Reference, demo_bam, random_records, write_bam

HERE = Path(__file__).resolve().parent
SAMTOOLS = shutil.which("samtools") or "samtools"
BAMCOUNTD = shlex.split(os.environ.get("BAMCOUNTD", "")) or [sys.executable, "-m", "bamcountd"]
#: Another bamcountd (``--baseline``, e.g. the previous commit's), timed in the same rounds.
BASELINE: list[str] = []
FILTERS: dict[str, list[str]] = {"unfiltered": [], "-F 0x904 -q 20": ["-F", "0x904", "-q", "20"]}


def cores() -> int:
    return len(os.sched_getaffinity(0))


def many_contigs(count: int = 3_341, seed: int = 11) -> list[Reference]:
    """GRCh38-like: the 25 chromosomes, then small contigs of 1-200 kb (alts, decoys, HLA)."""
    rng = random.Random(seed)
    small = [Reference(f"chrUn_contig{i}_alt:HLA*{i % 7}", rng.randrange(1_000, 200_000)) for i in range(count)]
    return [*HUMAN, *small]


def ensure_bam(path: Path, references: Sequence[Reference], reads: int, unplaced: int) -> Path:
    if path.exists() and Path(str(path) + ".bai").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(
        f"# generating {path.name}: {reads:,} reads on {len(references):,} references ...", file=sys.stderr, flush=True
    )
    chunks = _chunks(references, reads)
    parts = [path.with_suffix(f".part{k}.bam") for k in range(len(chunks) + 1)]
    jobs = [(parts[k], references, chunk, n, 0, k + 1) for k, (chunk, n) in enumerate(chunks)]
    jobs.append((parts[-1], references, [], 0, unplaced, 0))  # the unplaced reads come last
    with ProcessPoolExecutor(max_workers=cores()) as pool:
        list(pool.map(_write_part, jobs))
    joined = path.with_suffix(".part.bam")
    subprocess.run([SAMTOOLS, "cat", "--no-PG", "-o", str(joined), *map(str, parts)], check=True)
    for part in parts:
        part.unlink()
    subprocess.run([SAMTOOLS, "index", "-@", str(cores()), str(joined), str(path) + ".bai"], check=True)
    joined.rename(path)
    os.utime(str(path) + ".bai")
    print(f"# generated in {time.monotonic() - started:.0f} s, {path.stat().st_size / 1e6:.0f} MB", file=sys.stderr)
    return path


def _chunks(references: Sequence[Reference], reads: int, pieces: int = 48) -> list[tuple[list[Reference], int]]:
    """Consecutive references in chunks of about total/pieces bases (a large one alone), with
    each chunk's share of the reads."""
    total = sum(ref.length for ref in references)
    chunks: list[list[Reference]] = [[]]
    for ref in references:
        if chunks[-1] and sum(r.length for r in chunks[-1]) + ref.length > total / pieces:
            chunks.append([])
        chunks[-1].append(ref)
    return [(chunk, round(reads * sum(r.length for r in chunk) / total)) for chunk in chunks]


def _write_part(job: tuple[Path, Sequence[Reference], list[Reference], int, int, int]) -> None:
    path, header, chunk, reads, unplaced, seed = job
    records = random_records(chunk, reads, unplaced=unplaced, read_length=150, seed=seed) if chunk or unplaced else []
    write_bam(path, header, records, sort=False, index=False)


#: GNU time: the peak RSS of the command's own process tree.  wait4's figure for a child of
#: this benchmark is not that: a child forked from a big parent starts from the parent's RSS.
GNU_TIME = "/usr/bin/time" if Path("/usr/bin/time").is_file() else None


def timed(argv: Sequence[str]) -> tuple[float, float, bytes]:
    """Wall seconds, peak RSS (MiB, of the largest process in the command's tree) and stdout of
    one command.  The RSS is GNU time's (started from a small process: see GNU_TIME), else
    wait4's (which may show this benchmark's own size)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile() as rss:
        wrapped = [GNU_TIME, "-f", "%M", "-o", rss.name, *argv] if GNU_TIME else list(argv)
        started = time.monotonic()
        process = subprocess.Popen(wrapped, stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own usage, its children included
        wall = time.monotonic() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if process.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {err.read().decode()[-500:]}")
        kib = int(Path(rss.name).read_text().split()[-1]) if GNU_TIME else usage.ru_maxrss
        return wall, kib / 1024, out.read()


def command(argv: Sequence[str], parse: Callable[[bytes], int]) -> Callable[[], tuple[float, float, int]]:
    def run() -> tuple[float, float, int]:
        wall, rss, out = timed(argv)
        return wall, rss, parse(out)

    return run


def tsv_total(out: bytes) -> int:
    return int(out.decode().splitlines()[-1].split("\t")[1])


def bench(
    bam: Path, label: str, repeats: int, n: int, *, seed: bool = True, variants: Sequence[str] = ()
) -> dict[str, float]:
    medians: dict[str, float] = {}
    for filter_name, filters in FILTERS.items():
        contenders: dict[str, Callable[[], tuple[float, float, int]]] = {
            "samtools view -c": command([SAMTOOLS, "view", "-c", *filters, str(bam)], int),
            f"samtools view -c -@{n}": command([SAMTOOLS, "view", "-c", "-@", str(n), *filters, str(bam)], int),
            "seed applet: per-chromosome, 10 at a time": command(
                [sys.executable, str(HERE / "seed_applet.py"), str(bam), *filters], int
            ),
            "bamcountd count": command([*BAMCOUNTD, "count", *filters, "--format", "tsv", str(bam)], tsv_total),
        }
        for variant in variants:
            argv = [*BAMCOUNTD, "count", *shlex.split(variant), *filters, "--format", "tsv", str(bam)]
            contenders[f"bamcountd count {variant}"] = command(argv, tsv_total)
        if BASELINE:
            argv = [*BASELINE, "count", *filters, "--format", "tsv", str(bam)]
            contenders["bamcountd count (baseline)"] = command(argv, tsv_total)
        if not seed:  # one process per contig: minutes per run on thousands of contigs
            del contenders["seed applet: per-chromosome, 10 at a time"]
        times: dict[str, list[float]] = {name: [] for name in contenders}
        rss: dict[str, float] = {}
        totals: dict[str, int] = {}
        for _ in range(repeats):  # alternate, so drift hits every contender alike
            for name, run in contenders.items():
                wall, peak, total = run()
                times[name].append(wall)
                rss[name] = max(rss.get(name, 0.0), peak)
                totals[name] = total
        exact = totals["samtools view -c"]
        assert all(totals[name] == exact for name in totals if name.startswith("bamcountd")), (totals, exact)
        threaded = statistics.median(times[f"samtools view -c -@{n}"])
        single = statistics.median(times["samtools view -c"])
        print(f"\n{label}, {filter_name} — {exact:,} reads counted; median of {repeats}")
        print(f"{'':44} {'wall s':>8} {'vs 1 thr':>9} {'vs -@' + str(n):>8} {'peak MiB':>9}")
        for name, values in times.items():
            median = statistics.median(values)
            medians[f"{filter_name}|{name}"] = median
            note = "" if totals[name] == exact else f"  (counted {totals[name]:,}: wrong)"
            print(f"{name:44} {median:8.2f} {median / single:9.2f} {median / threaded:8.2f} {rss[name]:9.0f}{note}")
    return medians


def startup(data: Path, repeats: int) -> None:
    """A tiny BAM (the demo's 5,250 reads): bamcountd's fixed cost against one samtools call."""
    bam = demo_bam(data / "demo")
    steps = {
        "samtools view -c": [SAMTOOLS, "view", "-c", str(bam)],
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import asyncio'": [sys.executable, "-c", "import asyncio"],
        "bamcountd --version (imports only)": [*BAMCOUNTD, "--version"],
        "bamcountd count": [*BAMCOUNTD, "count", "--format", "tsv", str(bam)],
    }
    if BASELINE:
        steps["bamcountd count (baseline)"] = [*BASELINE, "count", "--format", "tsv", str(bam)]
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, argv in steps.items():
            times[name].append(timed(argv)[0])
    print(f"\nstart-up, a {bam.stat().st_size / 1e3:.0f} kB BAM (median of {repeats}):")
    for name, values in times.items():
        print(f"  {name:34} {statistics.median(values):6.3f} s")


def scaling(bam: Path, repeats: int, n: int) -> None:
    print(f"\nscaling on this machine, bamcountd count -j K --threads 1 (unfiltered, median of {repeats}):")
    for jobs in sorted({1, 2, 4, 8, 16, n} & set(range(1, n + 1))):
        argv = [*BAMCOUNTD, "count", "-j", str(jobs), "--threads", "1", "--format", "tsv", str(bam)]
        walls = [timed(argv)[0] for _ in range(repeats)]
        print(f"  -j {jobs:<3} {statistics.median(walls):6.2f} s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reads", type=int, default=6_000_000)
    parser.add_argument("--unplaced", type=int, default=60_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=HERE / "data")
    parser.add_argument("--skip-many-contigs", action="store_true")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--variant", action="append", default=[], help="bamcountd count options to time as well")
    parser.add_argument("--baseline", metavar="COMMAND", help="another bamcountd to time in the same rounds")
    args = parser.parse_args(argv)
    BASELINE[:] = shlex.split(args.baseline or "")
    compileall.compile_dir(Path(bamcountd.__file__).parent, quiet=1)
    n = cores()
    version = (
        subprocess.run([SAMTOOLS, "--version"], capture_output=True, check=True)
        .stdout.decode(errors="replace")
        .splitlines()[0]
    )
    print(f"# {n} cores, {version}, Python {sys.version.split()[0]}, {os.uname().machine}")
    startup(args.data, max(args.repeats, 10))
    few = ensure_bam(args.data / f"human25_{args.reads}.bam", HUMAN, args.reads, args.unplaced)
    base = bench(few, f"25 references + * ({few.stat().st_size / 1e6:.0f} MB)", args.repeats, n, variants=args.variant)
    if not args.skip_scaling:
        scaling(few, args.repeats, n)
    if not args.skip_many_contigs:
        refs = many_contigs()
        many = ensure_bam(args.data / f"contigs{len(refs)}_{args.reads}.bam", refs, args.reads, args.unplaced)
        label = f"{len(refs):,} references + * ({many.stat().st_size / 1e6:.0f} MB)"
        spread = bench(many, label, args.repeats, n, seed=False, variants=args.variant)
        wall, _, _ = timed([sys.executable, str(HERE / "seed_applet.py"), str(many)])
        print(f"(the seed applet on this BAM, once: {wall:.1f} s)")
        print("\nmany contigs vs 25 references, bamcountd count:")
        for filter_name in FILTERS:
            key = f"{filter_name}|bamcountd count"
            print(f"  {filter_name:16} {spread[key]:.2f} s vs {base[key]:.2f} s = {spread[key] / base[key]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
