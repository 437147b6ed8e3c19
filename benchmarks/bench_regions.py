"""Many BED intervals and many BAMs: bamcountd against samtools bedcov -c and bedtools multicov.

For each BAM (reads spread evenly over the 25 human chromosomes, and an exome-like one where
most reads sit on the targets), times, in the same run:

- ``bamcountd count BAM`` (the whole file: the reference the issue's target is set against),
- ``bamcountd count --regions-file targets.bed`` for each interval count,
- ``samtools bedcov -c`` and ``bedtools multicov`` on the same BED,

and prints wall time, peak RSS and the ratio to the whole-file count.  Every interval count of
bamcountd is checked against ``samtools view -c`` for a sample of intervals.  Then 10 BAMs in one
``bamcountd count`` run against 10 runs one after another, each column checked against its
single-BAM count.  ``--parts switch`` measures the two switch points of the sweep
(``plan.SWEEP_FROM`` ranges, ``plan.SWEEP_GAP_READS``) by running bamcountd with other values.
Peak RSS is GNU time's for each command alone (see ``bench_count.timed``).

    .venv/bin/python benchmarks/bench_regions.py [--reads 2040000] [--intervals 1000,20000,200000]
        [--parts spread,exome,cohort,switch]
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench_count import BAMCOUNTD, HERE, SAMTOOLS, ensure_bam, timed

from bamcountd.synth import HUMAN, Reference, write_bam

BEDTOOLS = shutil.which("bedtools")


def intervals(count: int, seed: int = 5) -> list[tuple[str, int, int]]:
    """Random 100-300 bp intervals spread over the chromosomes by length, sorted."""
    rng = random.Random(seed)
    total = sum(ref.length for ref in HUMAN)
    lengths = {ref.name: ref.length for ref in HUMAN}
    rows = []
    for _ in range(count):
        name, x = _locate(rng.randrange(total))
        width = rng.randrange(100, 301)
        start = min(x, lengths[name] - width)
        rows.append((name, start, start + width))
    order = {ref.name: k for k, ref in enumerate(HUMAN)}
    return sorted(rows, key=lambda row: (order[row[0]], row[1]))


def _locate(x: int) -> tuple[str, int]:
    """The chromosome and offset of genome position ``x``."""
    for ref in HUMAN:
        if x < ref.length:
            return ref.name, x
        x -= ref.length
    return HUMAN[-1].name, HUMAN[-1].length - 1


def write_bed(path: Path, rows: Sequence[tuple[str, int, int]]) -> Path:
    path.write_text("".join(f"{name}\t{start}\t{end}\n" for name, start, end in rows))
    return path


def exome_bam(path: Path, targets: Sequence[tuple[str, int, int]], reads: int, seed: int = 9) -> Path:
    """Most reads (90%) start inside a target, the rest anywhere."""
    if path.exists() and Path(str(path) + ".bai").exists():
        return path
    rng = random.Random(seed)
    lengths = {ref.name: ref.length for ref in HUMAN}
    total = sum(lengths.values())

    def records() -> object:
        for serial in range(reads):
            if rng.random() < 0.9:
                name, start, end = rng.choice(targets)
                position = rng.randrange(max(start - 100, 1), end) + 1
            else:
                name, offset = _locate(rng.randrange(total))
                position = max(1, min(offset, lengths[name] - 150))
            yield f"e{serial}\t0\t{name}\t{position}\t60\t150M\t*\t0\t0\t*\t*"

    print(f"# generating {path.name}: {reads:,} reads, 90% on the targets ...", file=sys.stderr, flush=True)
    return write_bam(path, [Reference(r.name, r.length) for r in HUMAN], records(), threads=2)  # type: ignore[arg-type]


def check(bam: Path, bed: Path, tsv: bytes, rows: Sequence[tuple[str, int, int]], sample: int = 20) -> None:
    counts = [int(line.split(b"\t")[1]) for line in tsv.splitlines()[:-1]]
    assert len(counts) == len(rows)
    for k in random.Random(1).sample(range(len(rows)), min(sample, len(rows))):
        name, start, end = rows[k]
        out = subprocess.run(
            [SAMTOOLS, "view", "-c", str(bam), f"{name}:{start + 1}-{end}"], capture_output=True, check=True
        )
        assert int(out.stdout) == counts[k], (rows[k], counts[k], out.stdout)


def bench_bam(bam: Path, label: str, sizes: Sequence[int], data: Path) -> None:
    whole, whole_rss, _ = timed([*BAMCOUNTD, "count", "--format", "tsv", str(bam)])
    print(f"\n{label}: whole-file bamcountd count {whole:.2f} s, {whole_rss:.0f} MiB")
    print(f"{'intervals':>10} {'contender':28} {'wall s':>8} {'peak MiB':>9} {'vs whole':>9}")
    for size in sizes:
        rows = intervals(size)
        bed = write_bed(data / f"targets{size}.bed", rows)
        contenders = {
            "bamcountd --regions-file": [*BAMCOUNTD, "count", "--regions-file", str(bed), "--format", "tsv", str(bam)],
            "samtools bedcov -c": [SAMTOOLS, "bedcov", "-c", str(bed), str(bam)],
        }
        if BEDTOOLS:
            contenders["bedtools multicov"] = [BEDTOOLS, "multicov", "-bams", str(bam), "-bed", str(bed)]
        for name, argv in contenders.items():
            wall, rss, out = timed(argv)
            if name.startswith("bamcountd"):
                check(bam, bed, out, rows)
            print(f"{size:>10,} {name:28} {wall:8.2f} {rss:9.0f} {wall / whole:9.2f}")


def cohort(data: Path, count: int = 10) -> None:
    bams = [
        ensure_bam(data / f"cohort{k}.bam", HUMAN[20:], 200_000, 2_000) if k == 0 else data / f"cohort{k}.bam"
        for k in range(count)
    ]
    for bam in bams[1:]:  # copies of the first: the same work each
        if not bam.exists():
            shutil.copyfile(bams[0], bam)
            shutil.copyfile(str(bams[0]) + ".bai", str(bam) + ".bai")
    bed = write_bed(data / "cohort.bed", [row for row in intervals(20_000) if row[0] in {r.name for r in HUMAN[20:]}])
    started = time.monotonic()
    singles = [timed([*BAMCOUNTD, "count", "--regions-file", str(bed), "--format", "tsv", str(bam)])[2] for bam in bams]
    one_by_one = time.monotonic() - started
    together, rss, out = timed([*BAMCOUNTD, "count", "--regions-file", str(bed), "--format", "tsv", *map(str, bams)])
    matrix = [line.split(b"\t") for line in out.splitlines()[1:]]
    for column, single in enumerate(singles, start=1):
        assert [row[column] for row in matrix] == [line.split(b"\t")[1] for line in single.splitlines()]
    print(f"\n{count} BAMs, {len(matrix) - 1:,} intervals: one after another {one_by_one:.2f} s, ")
    print(
        f"  in one run {together:.2f} s ({rss:.0f} MiB) = {together / one_by_one:.2f}x; every column equals its single count"
    )


def _patched(setting: str, value: int) -> list[str]:
    """bamcountd's command line with one of plan's switch points set to ``value``."""
    code = f"import sys; from bamcountd import cli, plan; plan.{setting} = {value}; sys.exit(cli.main(sys.argv[1:]))"
    return [sys.executable, "-c", code]


def switch_points(bam: Path, data: Path) -> None:
    """Time both sides of each switch point on the same BAM: sweeps against one ``view -c``
    per range around ``SWEEP_FROM``, and ``SWEEP_GAP_READS`` over interval counts."""
    print(f"\nswitch points on {bam.name}: sweeps from N ranges (plan.SWEEP_FROM)")
    print(f"{'ranges':>7} {'one view -c each':>17} {'swept':>8}")
    for count in (4, 8, 12, 16, 32):
        bed = write_bed(data / f"switch{count}.bed", intervals(count, seed=count))
        argv = ["count", "--regions-file", str(bed), "--format", "tsv", str(bam)]
        one, _, out_one = timed([*_patched("SWEEP_FROM", 1 << 30), *argv])
        swept, _, out_swept = timed([*_patched("SWEEP_FROM", 1), *argv])
        assert out_one == out_swept, count
        print(f"{count:>7} {one:17.2f} {swept:8.2f}")
    gaps = (30, 100, 300, 1_000, 3_000, 30_000)
    print("\ngap read through, in expected reads (plan.SWEEP_GAP_READS): wall s")
    print(f"{'intervals':>10} " + " ".join(f"{gap:>8,}" for gap in gaps))
    for size in (1_000, 20_000):
        bed = write_bed(data / f"targets{size}.bed", intervals(size))
        argv = ["count", "--regions-file", str(bed), "--format", "tsv", str(bam)]
        walls, outputs = [], set()
        for gap in gaps:
            wall, _, out = timed([*_patched("SWEEP_GAP_READS", gap), *argv])
            walls.append(wall)
            outputs.add(out)
        assert len(outputs) == 1, size
        print(f"{size:>10,} " + " ".join(f"{wall:8.2f}" for wall in walls))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reads", type=int, default=2_040_000)
    parser.add_argument("--intervals", default="1000,20000,200000")
    parser.add_argument("--data", type=Path, default=HERE / "data")
    parser.add_argument("--parts", default="spread,exome,cohort", help="of spread, exome, cohort, switch")
    args = parser.parse_args(argv)
    sizes = [int(word) for word in args.intervals.split(",")]
    parts = set(args.parts.split(","))
    args.data.mkdir(parents=True, exist_ok=True)
    spread = ensure_bam(args.data / f"human25_{args.reads}.bam", HUMAN, args.reads, args.reads // 100)
    if "spread" in parts:
        bench_bam(spread, f"reads spread evenly ({args.reads:,})", sizes, args.data)
    if "exome" in parts:
        exome = exome_bam(args.data / f"exome_{args.reads}.bam", intervals(max(sizes)), args.reads)
        bench_bam(exome, f"exome-like, 90% of {args.reads:,} reads on the {max(sizes):,} targets", sizes, args.data)
    if "cohort" in parts:
        cohort(args.data)
    if "switch" in parts:
        switch_points(spread, args.data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
