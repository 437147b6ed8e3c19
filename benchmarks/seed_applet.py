"""The seed design, as the DNAnexus tutorial applet runs it: read the header's @SQ names, then
one ``samtools view -c [filters] BAM NAME`` per name, 10 at a time in a thread pool, and sum.
(Without ``*``, as the applet: its total misses the unplaced reads.)  Prints the total.

    python benchmarks/seed_applet.py BAM [samtools view filters...]
"""

from __future__ import annotations

import re
import subprocess
import sys
from multiprocessing.dummy import Pool


def main(argv: list[str]) -> int:
    bam, filters = argv[0], argv[1:]
    header = subprocess.run(["samtools", "view", "-H", bam], capture_output=True, check=True).stdout.decode()
    regions = re.findall(r"SN:(\S+)\s", header)
    commands = [["samtools", "view", "-c", *filters, bam, "{" + region + "}"] for region in regions]
    with Pool(10) as pool:
        outputs = pool.map(lambda argv: subprocess.run(argv, capture_output=True, check=True).stdout, commands)
    print(sum(int(out) for out in outputs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
