"""bamcountd against samtools on a CRAM, in one run: wall time, medians, ratios.

Generates (once, cached in benchmarks/data/) a reference-based CRAM: 150 bp reads drawn from a
random reference with a mismatch in three reads of ten, binned qualities (four values, as many
pipelines write them), ~25 chromosome-like references and 200 small contigs, plus unplaced
reads.  Then runs, alternately, with no filters and with ``-F 0x904 -q 20``:

- ``samtools view -c`` and ``samtools view -c -@N`` with samtools' own defaults (every field
  decoded; the reference given with ``-T``),
- ``samtools view -c -@N`` with ``required_fields`` and ``decode_md=0`` chosen by hand,
- ``bamcountd count`` (the CLI, Python start-up included; ``BAMCOUNTD`` names another
  bamcountd to time, as in bench_count.py: an installed wheel starts ~20 ms sooner than the
  editable install of a checkout, whose import hook runs at every start),
- ``bamcountd count`` again with an empty cache: a new file's first count,
- ``bamcountd count -r chrM``: the least a count of this CRAM costs (Python's start, the
  checks, one small query), which bounds its ratio on a small CRAM.

``--shape grch38`` gives the CRAM GRCh38's 3,366 references (see SHAPES) instead.

    .venv/bin/python benchmarks/bench_cram.py [--reads 2000000 10000000 ...] [--shape grch38] [--repeats 3]
"""

from __future__ import annotations

import argparse
import compileall
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench_count import BAMCOUNTD

HERE = Path(__file__).resolve().parent
SAMTOOLS = shutil.which("samtools") or "samtools"
FILTERS: dict[str, tuple[list[str], int]] = {
    "unfiltered": ([], 0x2),
    "-F 0x904 -q 20": (["-F", "0x904", "-q", "20"], 0x12),
}


#: The benchmark CRAMs' header shapes: ``simple``, 24 chromosome-like references and 200 small
#: contigs; ``grch38``, GRCh38's analysis set with its HLA contigs (3,366 references, scaled
#: down as the chromosomes are): alts, decoys and HLA contigs that in header order alternate
#: between sharing multi-reference containers and having their own, as UK Biobank's CRAMs do.
SHAPES = ("simple", "grch38")


def _references(shape: str, rng: random.Random) -> list[tuple[str, int, float]]:
    """(name, length, reads per base relative to a chromosome's) of each reference of ``shape``."""
    refs = [(f"chr{i}", 4_000_000 - i * 100_000, 1.0) for i in range(1, 23)]
    refs += [("chrX", 3_000_000, 1.0), ("chrM", 16_569, 1.0)]
    if shape == "simple":
        return refs + [(f"chrUn_{i}", rng.randrange(2_000, 50_000), 1.0) for i in range(200)]
    refs += [("chrY", 1_000_000, 0.3)]
    refs += [(f"chr{rng.randrange(1, 23)}_KI27{i:04d}v1_random", rng.randrange(1_000, 20_000), 0.5) for i in range(42)]
    refs += [(f"chrUn_KI27{i:04d}v1", rng.randrange(500, 15_000), 0.5) for i in range(127)]
    refs += [("chrEBV", 17_182, 0.2)]
    refs += [(f"chr{rng.randrange(1, 23)}_KI27{i:04d}v1_alt", rng.randrange(2_000, 60_000), 0.3) for i in range(261)]
    refs += [
        (f"chrUn_JTFH0100{i:04d}v1_decoy", rng.randrange(200, 6_000), rng.choice([0, 0.2, 1, 5])) for i in range(2385)
    ]
    refs += [
        (f"HLA-{rng.choice('ABC')}*{i // 25:02d}:{i % 25:02d}:01", rng.randrange(300, 400), 2.0) for i in range(525)
    ]
    return refs


def make_cram(folder: Path, reads: int, seed: int = 1, shape: str = "simple") -> tuple[Path, Path]:
    stem = f"bench-{reads}" if shape == "simple" else f"bench-{shape}-{reads}"
    cram, fasta = folder / f"{stem}.cram", folder / f"{stem}.fa"
    if cram.is_file() and (folder / f"{cram.name}.crai").is_file():
        return cram, fasta
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    refs = _references(shape, rng)
    table = bytes.maketrans(bytes(range(256)), b"ACGT" * 64)
    bases = {name: rng.randbytes(length).translate(table).decode() for name, length, _ in refs}
    with open(fasta, "w") as out:
        for name, seq in bases.items():
            out.write(f">{name}\n" + "".join(seq[i : i + 60] + "\n" for i in range(0, len(seq), 60)))
    subprocess.run([SAMTOOLS, "faidx", str(fasta)], check=True)
    total = sum(length * density for _, length, density in refs)
    quals = "".join(rng.choices("#-7F", [1, 3, 10, 86], k=100_000))
    flags, weights = [99, 147, 83, 163, 1123, 355, 2147, 77, 101], [30, 30, 15, 15, 3, 2, 1, 2, 2]
    bam = folder / "bench-cram-source.bam"
    sort = subprocess.Popen([SAMTOOLS, "sort", "-@2", "--no-PG", "-o", str(bam), "-"], stdin=subprocess.PIPE, text=True)
    assert sort.stdin is not None
    sort.stdin.write("@HD\tVN:1.6\tSO:coordinate\n" + "".join(f"@SQ\tSN:{n}\tLN:{n_}\n" for n, n_, _ in refs))
    serial = 0
    for name, length, density in refs:
        seq = bases[name]
        for _ in range(round(reads * length * density / total)):
            serial += 1
            pos = rng.randrange(0, max(length - 150, 1))
            read = seq[pos : pos + 150].ljust(150, "A")
            if rng.random() < 0.3:
                cut = rng.randrange(150)
                read = read[:cut] + "A" + read[cut + 1 :]
            flag = rng.choices(flags, weights)[0]
            q = rng.randrange(0, 99_000)
            mapq, cigar = (0, "*") if flag & 4 else (rng.choice([0, 3, 20, 40, 60, 60, 60]), "150M")
            sort.stdin.write(
                f"r{serial}\t{flag}\t{name}\t{pos + 1}\t{mapq}\t{cigar}\t=\t{pos + 100}\t250\t{read}\t{quals[q : q + 150]}\n"
            )
    for i in range(reads // 400):
        sort.stdin.write(f"u{i}\t4\t*\t0\t0\t*\t*\t0\t0\t{'ACGT' * 37}AC\t{quals[:150]}\n")
    sort.stdin.close()
    if sort.wait() != 0:
        raise SystemExit("samtools sort failed")
    subprocess.run([SAMTOOLS, "view", "-@2", "-C", "-T", str(fasta), "-o", str(cram), str(bam)], check=True)
    subprocess.run([SAMTOOLS, "index", str(cram)], check=True)
    bam.unlink()
    return cram, fasta


def timed(argv: list[str], env: dict[str, str], cwd: Path | None = None) -> tuple[float, str]:
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False, cwd=cwd)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {done.stderr}")
    return seconds, done.stdout


def setup(
    doc: str | None, *, sizes: tuple[int, ...] = (2_000_000,)
) -> tuple[argparse.Namespace, list[tuple[Path, Path]], int]:
    """The command line (--reads, one size or more, ``sizes`` by default; --repeats), the
    benchmark CRAM and its FASTA of each size, the cores."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reads", type=int, nargs="+", default=list(sizes))
    parser.add_argument("--shape", choices=SHAPES, default="simple", help="the CRAM's header (see SHAPES)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    crams = [make_cram(HERE / "data", reads, shape=args.shape) for reads in args.reads]
    # As an installed package is, byte-compiled: with PYTHONDONTWRITEBYTECODE set, every start
    # would otherwise compile bamcountd again, and that would be timed.
    compileall.compile_dir(HERE.parent / "bamcountd", quiet=1)
    return args, crams, len(os.sched_getaffinity(0))


def main() -> int:
    # Two sizes: on the small one, bamcountd's start-up is a third of its time.
    args, crams, cores = setup(__doc__, sizes=(2_000_000, 10_000_000))
    for (cram, fasta), reads in zip(crams, args.reads, strict=True):
        run_size(cram, fasta, reads, cores, args.repeats)
    return 0


def run_size(cram: Path, fasta: Path, reads: int, cores: int, repeats: int) -> None:
    """One CRAM's table: each command's rounds, median, and ratio to ``samtools view -c -@N``."""
    with tempfile.TemporaryDirectory(prefix="bench-cram-") as scratch:
        # No reference server: samtools gets the FASTA with -T; bamcountd needs none.
        env = {**os.environ, "REF_PATH": f"{scratch}/none/%s", "XDG_CACHE_HOME": scratch}
        bamcountd = [*BAMCOUNTD, "count", str(cram), "--format", "json"]
        print(f"\n# {cram.name}: {reads} reads, {cram.stat().st_size >> 20} MiB; {cores} cores; {repeats} rounds")
        for label, (filters, fields) in FILTERS.items():
            by_hand = ["--input-fmt-option", f"required_fields={fields:#x}", "--input-fmt-option", "decode_md=0"]
            commands = {
                "samtools view -c": [SAMTOOLS, "view", "-c", "-T", str(fasta), *filters, str(cram)],
                f"samtools view -c -@{cores}": [
                    SAMTOOLS,
                    "view",
                    "-c",
                    f"-@{cores}",
                    "-T",
                    str(fasta),
                    *filters,
                    str(cram),
                ],
                f"samtools -@{cores} required_fields": [
                    SAMTOOLS,
                    "view",
                    "-c",
                    f"-@{cores}",
                    *by_hand,
                    *filters,
                    str(cram),
                ],
                "bamcountd count": [*bamcountd, *filters],
                # A new file's first count: no proof of an earlier one in the cache (see FIRST).
                FIRST: [*bamcountd, *filters],
                # What any count of this CRAM costs: Python's start, the checks, one small query.
                STARTUP: [*bamcountd, *filters, "-r", "chrM"],
            }
            times: dict[str, list[float]] = {name: [] for name in commands}
            answers: dict[str, str] = {}
            for round_ in range(repeats):
                for name, argv in commands.items():
                    fresh = {**env, "XDG_CACHE_HOME": f"{scratch}/first-{len(filters)}-{round_}"}
                    seconds, out = timed(argv, fresh if name == FIRST else env)
                    times[name].append(seconds)
                    if name != STARTUP:
                        answers[name] = out.strip() if not name.startswith("bamcountd") else str(total_of(out))
            if len(set(answers.values())) != 1:
                raise SystemExit(f"counts differ: {answers}")
            base = statistics.median(times[f"samtools view -c -@{cores}"])
            print(f"\n## {label} (count {answers['bamcountd count']})")
            for name, values in times.items():
                median = statistics.median(values)
                print(
                    f"{name:34s} median {median:6.3f} s  ({' '.join(f'{v:.3f}' for v in values)})  x{median / base:.2f}"
                )


STARTUP = "bamcountd count -r chrM (start-up)"
#: ``bamcountd count`` with an empty cache, as a new file's one count: the other rows share a
#: cache, where a filtered count of a BAM may trust what an earlier count proved (README).
FIRST = "bamcountd count, empty cache"


def total_of(out: str) -> int:
    """The total of ``bamcountd count --format json``."""
    import json

    return int(json.loads(out)["total"])


if __name__ == "__main__":
    raise SystemExit(main())
