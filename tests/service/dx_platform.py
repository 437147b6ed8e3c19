"""The DNAnexus emulator as a process of its own, for the dx-watch unit under systemd: it serves
on loopback inside the container, holds one BAM in /incoming, writes how to reach it to
WORK/platform.json and, while it runs, the names and bytes of the files in /counts to
WORK/counts.json.  Run as ``python3 dx_platform.py WORK BAM``, with dnanexus_emulator.py beside
it: the standard library is all the two need, so the system's Python runs them inside."""

from __future__ import annotations

import base64
import json
import sys
import time
from pathlib import Path

from dnanexus_emulator import Emulator  # type: ignore[import-not-found]  # copied beside this file


def main(work: Path, bam: Path) -> None:
    with Emulator(work / "platform") as api:
        api.add_file(bam.name, bam.read_bytes(), folder="/incoming")
        reach = {"port": api.port, "token": api.token, "project": api.project}
        (work / "platform.json").write_text(json.dumps(reach))
        while True:
            with api.lock:
                counts = {f.name: base64.b64encode(f.data).decode() for f in api.files_in("/counts") if f.data}
            partial = work / ".counts.json"
            partial.write_text(json.dumps(counts))
            partial.replace(work / "counts.json")
            time.sleep(0.2)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
