#!/usr/bin/env python3
# bamcount applet: exact per-region read counts of a BAM with bamcountd (samtools view -c).
# The entry points live in bamcountd.dnanexus.job; this file only hands control to dxpy.
from __future__ import annotations

import subprocess
import sys

try:
    import bamcountd.dnanexus.job  # noqa: F401  (registers the entry points)
except ImportError:
    # On a worker: install bamcountd and its dependencies from the wheels that
    # dnanexus/build.sh put into resources/opt/bamcountd (unpacked at / on the worker).
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-index",
            "--find-links",
            "/opt/bamcountd",
            "bamcountd",
        ],
        check=True,
    )
    import bamcountd.dnanexus.job  # noqa: F401

import dxpy

dxpy.run()
